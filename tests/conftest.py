import pytest

from tests.distributed import ProcessPool


@pytest.fixture(scope="session")
def process_pools():
    """`process_pools(world_size)` gives a gloo pool of that size, started once per session."""
    pools: dict[int, ProcessPool] = {}

    def get(world_size: int) -> ProcessPool:
        pool = pools.get(world_size)
        if pool is None or pool.broken:
            pool = pools[world_size] = ProcessPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        if not pool.broken:
            pool.close()

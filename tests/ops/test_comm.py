"""The ring walk that sends partial gradients home, on gloo with 1-4 ranks: every rank's parts
for a block reach that block's owner, with the rows they cover, once, and nothing else does."""

from __future__ import annotations

import pytest
import torch

from lightning_seqpar.ops._comm import Ring, ring_visit_sending_home


def parts_plan(visitor: int, owner: int) -> list[slice]:
    """Which rows of `owner`'s block `visitor` sends partials for: none, one range or two, so the
    walk meets empty steps and steps of several parts (the own block always has one)."""
    if visitor == owner:
        return [slice(0, 6)]
    kind = (visitor + 2 * owner) % 3
    return [[], [slice(2, 6)], [slice(0, 2), slice(3, 5)]][kind]


def walk() -> list:
    ring = Ring()
    received = []

    def visit(owner: int, block: torch.Tensor) -> list:
        # The first tensor says who computed the part for whom; the second, which block it saw.
        return [(rows, (torch.full((rows.stop - rows.start,), 100.0 * ring.rank + owner), block[: rows.stop - rows.start].clone()))
                for rows in parts_plan(ring.rank, owner)]

    def expected(visitor: int) -> list:
        return [(rows, (torch.empty(rows.stop - rows.start), torch.empty(rows.stop - rows.start)))
                for rows in parts_plan(visitor, ring.rank)]

    def arrived(parts: list) -> None:
        received.extend(((rows.start, rows.stop), who.tolist(), seen.tolist()) for rows, (who, seen) in parts)

    ring_visit_sending_home(ring, torch.full((6,), float(ring.rank)), visit, expected, arrived)
    return received


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_partials_reach_their_owner_with_their_rows(process_pools, world_size):
    results = process_pools(world_size).run_ok(walk)
    for owner, received in enumerate(results):
        # The own block's parts first, then what the visitors of steps 1, 2, ... computed.
        want = [((rows.start, rows.stop), [100.0 * visitor + owner] * (rows.stop - rows.start), [float(owner)] * (rows.stop - rows.start))
                for step in range(world_size) for visitor in [(owner + step) % world_size]
                for rows in parts_plan(visitor, owner)]
        assert received == want


def test_owner_and_visitor_are_inverse_steps():
    ring = Ring()
    ring.rank, ring.size = 1, 4
    assert [ring.owner(s) for s in range(4)] == [1, 0, 3, 2]
    assert [ring.visitor(s) for s in range(4)] == [1, 2, 3, 0]

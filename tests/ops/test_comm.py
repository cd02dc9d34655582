"""The ring walks on gloo with 1-4 ranks: every rank's parts for a block reach that block's
owner, with the rows they cover, once, and nothing else does; inside a subgroup whose ranks
are not the world's, blocks and parts go to group neighbours and owners, not to world ranks of
the same number."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_seqpar.ops import _comm
from lightning_seqpar.ops._comm import SCHEDULES, Ring, ring_visit, ring_visit_sending_home, step_groups


def parts_plan(visitor: int, owner: int) -> list[slice]:
    """Which rows of `owner`'s block `visitor` sends partials for: none, one range or two, so the
    walk meets empty steps and steps of several parts (the own block always has one)."""
    if visitor == owner:
        return [slice(0, 6)]
    kind = (visitor + 2 * owner) % 3
    return [[], [slice(2, 6)], [slice(0, 2), slice(3, 5)]][kind]


def my_group(subgroups: list[list[int]] | None):
    """None (the world), or the one of `subgroups` (every rank creates all, in order) that holds
    this rank."""
    if subgroups is None:
        return None
    groups = [dist.new_group(ranks, backend="gloo") for ranks in subgroups]
    return next(g for g, ranks in zip(groups, subgroups) if dist.get_rank() in ranks)


def walk(subgroups: list[list[int]] | None = None, steps_per_visit: int = 1) -> list:
    ring = Ring(my_group(subgroups))
    received, visits = [], []
    local = torch.full((6,), float(ring.rank))

    def receive(steps: tuple) -> tuple:
        # The visit's blocks side by side in one buffer, as the ring attention's backward lays
        # them, each block's pieces (its two halves) received apart.
        buffer = torch.full((len(steps), 6), -1.0)
        return buffer, [[row[:3], row[3:]] for row in buffer]

    def visit(steps: tuple, buffer) -> list:
        visits.append(steps)
        blocks = [local] if buffer is None else list(buffer)
        # The first tensor says who computed the part for whom; the second, which block it saw.
        def part(step: int, rows: slice, block: torch.Tensor):
            n = rows.stop - rows.start
            return rows, (torch.full((n,), 100.0 * ring.rank + ring.owner(step)), block[:n].clone())

        return [[part(step, rows, block) for rows in parts_plan(ring.rank, ring.owner(step))] for step, block in zip(steps, blocks)]

    def expected(visitor: int, step: int) -> list:
        assert ring.visitor(step) == visitor
        return [(rows, (torch.empty(rows.stop - rows.start), torch.empty(rows.stop - rows.start)))
                for rows in parts_plan(visitor, ring.rank)]

    def arrived(parts: list) -> None:
        received.extend(((rows.start, rows.stop), who.tolist(), seen.tolist()) for rows, (who, seen) in parts)

    ring_visit_sending_home(ring, lambda step: [local[:3], local[3:]], receive, visit, expected, arrived, steps_per_visit=steps_per_visit)
    assert visits == list(step_groups(ring.size, steps_per_visit))
    return received


def want_received(owner: int, world_size: int) -> list:
    """What `walk` returns on group rank `owner`: the own block's parts first, then what the
    visitors of steps 1, 2, ... computed."""
    return [((rows.start, rows.stop), [100.0 * visitor + owner] * (rows.stop - rows.start), [float(owner)] * (rows.stop - rows.start))
            for step in range(world_size) for visitor in [(owner + step) % world_size]
            for rows in parts_plan(visitor, owner)]


@pytest.mark.parametrize("steps_per_visit", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_partials_reach_their_owner_with_their_rows(process_pools, world_size, steps_per_visit):
    results = process_pools(world_size).run_ok(walk, None, steps_per_visit)
    for owner, received in enumerate(results):
        assert received == want_received(owner, world_size)


def visit_order(subgroups: list[list[int]] | None, schedule: str) -> tuple[int, list]:
    """This rank's group rank and the blocks it saw, by owner, in a walk of its group's ring."""
    ring = Ring(my_group(subgroups))
    seen = []
    ring_visit(ring, torch.full((3,), 10.0 * dist.get_rank()), lambda owner, block: seen.append((owner, block.tolist())),
               schedule=schedule)
    return ring.rank, seen


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_block_visits_every_rank_once(process_pools, world_size, schedule):
    for rank, (group_rank, seen) in enumerate(process_pools(world_size).run_ok(visit_order, None, schedule)):
        assert group_rank == rank
        assert seen == [((rank - s) % world_size, [10.0 * ((rank - s) % world_size)] * 3) for s in range(world_size)]


# Group ranks (the order of the listed world ranks) differ from world ranks in every group of
# more than one rank, and no group of 4 ranks is a block of consecutive world ranks.
SUBGROUPS = {3: [[0], [1, 2]], 4: [[0, 2], [1, 3]]}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("world_size", [3, 4])
def test_walks_stay_inside_a_subgroup_in_its_rank_order(process_pools, world_size, schedule):
    subgroups = SUBGROUPS[world_size]
    pool = process_pools(world_size)
    for world_rank, (group_rank, seen) in enumerate(pool.run_ok(visit_order, subgroups, schedule)):
        members = next(ranks for ranks in subgroups if world_rank in ranks)
        assert members[group_rank] == world_rank
        steps = range(len(members))
        owners = [(group_rank - s) % len(members) for s in steps]
        assert seen == [(o, [10.0 * members[o]] * 3) for o in owners]
    for world_rank, received in enumerate(pool.run_ok(walk, subgroups, 2)):
        members = next(ranks for ranks in subgroups if world_rank in ranks)
        assert received == want_received(members.index(world_rank), len(members))


def test_owner_and_visitor_are_inverse_steps():
    ring = Ring()
    ring.rank, ring.size = 1, 4
    assert [ring.owner(s) for s in range(4)] == [1, 0, 3, 2]
    assert [ring.visitor(s) for s in range(4)] == [1, 2, 3, 0]


class _LoggedRing(Ring):
    """A ring of `size` ranks without a process group that logs when each fetch is posted and
    waited on; a fetch "receives" its owner's number."""

    def __init__(self, rank: int, size: int, log: list):
        super().__init__()
        self.rank, self.size, self.log = rank, size, log

    def fetch(self, step, sends, recvs):
        self.log.append(f"post {step}")
        log = self.log

        class Request:
            def wait(self):
                log.append(f"wait {step}")

        for recv in recvs:
            recv.fill_(float(self.owner(step)))
        return [Request()]


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_direct_walk_posts_each_fetch_blocks_in_flight_steps_ahead(size):
    """The fetch of step s + BLOCKS_IN_FLIGHT is posted before the wait for step s and after the
    visit of step s - 1 (so on CUDA it waits for no compute but what was queued before it), and
    every fetch is waited on before its block is used."""
    log = []
    ring = _LoggedRing(rank=1 % size, size=size, log=log)
    ring_visit(ring, torch.zeros(2), lambda owner, block: log.append(f"visit {owner}:{block[0].item():g}"))
    ahead = _comm.BLOCKS_IN_FLIGHT
    want = [f"post {s}" for s in range(1, min(ahead, size - 1) + 1)] + [f"visit {ring.rank}:0"]
    for step in range(1, size):
        if step + ahead < size:
            want.append(f"post {step + ahead}")
        owner = ring.owner(step)
        want += [f"wait {step}", f"visit {owner}:{owner}"]
    assert log == want


def test_an_unknown_schedule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'direct', 'neighbour'"):
        ring_visit(Ring(), torch.zeros(2), lambda owner, block: None, schedule="tree")


def test_step_groups_put_the_own_block_alone_and_cover_every_step_once():
    assert step_groups(1, 2) == ((0,),)
    assert step_groups(2, 4) == ((0,), (1,))
    assert step_groups(8, 2) == ((0,), (1, 2), (3, 4), (5, 6), (7,))
    assert step_groups(8, 4) == ((0,), (1, 2, 3, 4), (5, 6, 7))
    assert step_groups(4, 4) == ((0,), (1, 2, 3))
    assert step_groups(4, 1) == ((0,), (1,), (2,), (3,))
    assert step_groups(5, 3) == ((0,), (1, 2, 3), (4,))
    for size in range(1, 18):
        for per_visit in range(1, 6):
            groups = step_groups(size, per_visit)
            assert [s for g in groups for s in g] == list(range(size))
            assert groups[0] == (0,) and max(map(len, groups)) <= per_visit
    with pytest.raises(ValueError, match="at least 1"):
        step_groups(4, 0)


def test_visits_of_two_blocks_post_the_next_visit_before_waiting():
    """With two blocks per visit, the next visit's fetches are posted before the wait for the
    current one's (BLOCKS_IN_FLIGHT = 2 blocks ahead), and both of a visit's fetches are waited
    on before it runs."""
    log = []
    ring = _LoggedRing(rank=0, size=6, log=log)
    ring.send_home = lambda step, parts, expected: (expected, [])

    def receive(steps):
        buffer = torch.zeros(len(steps))
        return buffer, [[buffer[i : i + 1]] for i in range(len(steps))]

    def visit(steps, buffer):
        log.append(f"visit {steps}")
        return [[] for _ in steps]

    ring_visit_sending_home(ring, lambda step: [torch.zeros(1)], receive, visit, lambda visitor, step: [],
                            lambda parts: None, steps_per_visit=2)
    assert _comm.BLOCKS_IN_FLIGHT == 2
    assert log == ["post 1", "post 2", "visit (0,)", "post 3", "post 4", "wait 1", "wait 2", "visit (1, 2)",
                   "post 5", "wait 3", "wait 4", "visit (3, 4)", "wait 5", "visit (5,)"]

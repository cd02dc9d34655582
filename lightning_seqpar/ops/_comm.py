"""The ring: asynchronous block exchange inside a process group, and the walks that both
attention algorithms are built from.

- `ring_visit`: every rank's block visits every rank once; the next blocks are already in
  flight while the current one is used. Two schedules (`SCHEDULES`):
  - "neighbour", the paper's ring: each rank passes on the block it just received, so only the
    next block can be in flight;
  - "direct": at step s each rank sends its own block to the rank s after it and receives the
    block of the rank s before it, so `BLOCKS_IN_FLIGHT` blocks can be in flight at once.
- `ring_visit_sending_home`: the direct walk in visits of one or more blocks (`step_groups`),
  each received where the visit wants it, and each visit's partial gradients for the visiting
  blocks are sent straight to their owners, in the kernel's dtype, while the next visit
  computes; the owner sums what arrives. How the ring attention's dK/dV get home.
- `ring_visit_and_reduce`: the neighbour walk, and each visit adds a partial gradient for the
  visiting block's owner into a buffer that travels behind the block; it arrives home summed
  after one more hop (the paper's RSA, whose partials are float32 sums anyway).

Why direct for the ring attention: a transfer posted on a CUDA stream starts only once the
compute queued before it is done (NCCL's stream waits for the poster's), and its kernels get
SMs only as the next block kernel's blocks retire. Posted one step ahead, each transfer then
ends a little after the block it overlaps, and the next block waits for it at every step
(0.25 ms of a 2.10 ms forward at 4K tokens per rank, causal, in an H100 trace). Two steps
ahead, it has a whole block's time to spare, once the walk's first transfer gets its SMs
before the first block kernel does: that is a race, which a replay of the 4K forward on an
H100 won every other time (results/direct_walk_before_after.txt); a replay that loses it
waits as before. A neighbour ring cannot post two steps ahead: the second block is not there
until the first has arrived.

Sending home moves fewer bytes than a travelling sum: a partial goes once, in bf16 where the
kernel returns bf16, where a travelling float32 sum goes N times at twice the width and is read
and written in float32 at every hop; the owner sums several partials in one pass
(`_merge.SummedRows`). The price of both direct patterns: at step s every rank exchanges with
the ranks s away, not with its neighbours, which costs nothing inside one NVLink/NVSwitch
domain but crosses more node boundaries than a ring when a group spans nodes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
import torch.distributed as dist

# Distinct tags keep the block ring and the gradient ring apart on backends that match by tag
# (gloo); NCCL matches by issue order, which every rank shares.
BLOCK_TAG = 0
GRAD_TAG = 1

SCHEDULES = ("direct", "neighbour")
# Blocks of the direct walk in flight ahead of the one being used: one more K/V block in
# memory than the neighbour ring holds, so that a transfer has a whole step to land in.
BLOCKS_IN_FLIGHT = 2


class Ring:
    """Sends to and receives from the ranks of `group` (default: the world), by group rank:
    the neighbours (`exchange`) or the ranks a walk's step away (`fetch`, `send_home`).
    `process_group` is the group itself (the world's for None; None without a process group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            self.process_group = group or dist.group.WORLD
        else:
            self.size, self.rank, self.process_group = 1, 0, None
        self._coalesces: dict[torch.device, bool] = {}

    def owner(self, step: int) -> int:
        """Group rank whose block this rank holds at `step` of a walk."""
        return (self.rank - step) % self.size

    def visitor(self, step: int) -> int:
        """Group rank that holds this rank's block at `step` of a walk."""
        return (self.rank + step) % self.size

    def exchange(self, send: torch.Tensor, tag: int) -> tuple[torch.Tensor, list]:
        """Post send of `send` to the next rank and a receive from the previous one; returns the
        receive buffer (valid after `wait`) and the pending requests."""
        recv = torch.empty_like(send)
        return recv, self._post([send], self.visitor(1), [recv], self.owner(1), tag)

    def fetch(self, step: int, sends: list, recvs: list) -> list:
        """Post sends of `sends`, rows of this rank's block, to the rank that visits it at
        `step`, and receives of rows of the block this rank visits at `step` into `recvs`,
        buffers shaped as what its owner sends (each contiguous, anywhere: a visit may want two
        blocks side by side); returns the pending requests."""
        return self._post(sends, self.visitor(step), recvs, self.owner(step), BLOCK_TAG)

    def send_home(self, step: int, parts: list, expected: list) -> tuple[list, list]:
        """Post sends of `parts`, this rank's partial gradients for the block it visited at
        `step`, to that block's owner, and receives from the rank that visited this rank's
        block at `step` into `expected`, buffers shaped as what that rank sends. Parts are
        `(rows, tensors)`, `rows` the owner's local rows they cover. Returns the received parts
        (valid after `wait`) and the pending requests."""
        sends = [t.contiguous() for _, tensors in parts for t in tensors]
        recvs = [t for _, tensors in expected for t in tensors]
        return expected, self._post(sends, self.owner(step), recvs, self.visitor(step), GRAD_TAG)

    def _post(self, sends: list, to: int, recvs: list, source: int, tag: int) -> list:
        """Post `sends` to group rank `to` and `recvs` from group rank `source` as one batch;
        returns the requests to wait on.

        What `dist.batch_isend_irecv` does, on the process group itself: its per-op Python
        (P2POp objects, a rank translation and checks per tensor) cost 52 us of host time per
        exchange against 31 us for these calls, measured on an H200 host (2026-11-26), and at
        4K tokens per rank a causal ring step runs ~160 us on the device, so the host falls
        behind. Backends that coalesce (NCCL) get every op of the batch in one group call."""
        if not sends and not recvs:
            return []
        pg = self.process_group
        device = (sends or recvs)[0].device
        coalesce = self._coalesces.get(device)
        if coalesce is None:
            coalesce = self._coalesces[device] = bool(pg._get_backend(device).supports_coalescing)
        if coalesce:
            pg._start_coalescing(device)
        works = [pg.send([t], to, tag) for t in sends] + [pg.recv([t], source, tag) for t in recvs]
        return [pg._end_coalescing(device)] if coalesce else works


def collective_device(group) -> torch.device:
    """Where small bookkeeping tensors must live for collectives on `group`'s backend."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _passed_on(ring: Ring, local: torch.Tensor):
    """`(owner, block)` at every step of the neighbour walk, the local block first; the caller
    is done with each block before it asks for the next."""
    current = local
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            incoming, pending = ring.exchange(current, BLOCK_TAG)
        yield ring.owner(step), current
        if not last:
            wait(pending)
            current = incoming


def step_groups(size: int, steps_per_visit: int) -> tuple[tuple[int, ...], ...]:
    """The steps of a walk of `size` ranks as its visits see them: the own block alone, then
    `steps_per_visit` consecutive steps at a time (fewer in the last visit). The same on every
    rank, so every rank posts its transfers in the same order."""
    if steps_per_visit < 1:
        raise ValueError(f"steps_per_visit must be at least 1, got {steps_per_visit}")
    return ((0,),) + tuple(tuple(range(s, min(s + steps_per_visit, size))) for s in range(1, size, steps_per_visit))


def _fetched_together(ring: Ring, send: Callable, receive: Callable, steps_per_visit: int):
    """`(steps, buffer)` for every visit of `step_groups` of the direct walk, the own block first
    (its buffer None: the caller holds it). `send(step)` gives the tensors of this rank's block
    to send at `step` (to the rank that visits it then); `receive(steps)` gives
    `(buffer, recvs)`: recvs[i] the tensors, shaped as what the owner of step steps[i] sends,
    into which its block lands, and buffer what the visit is handed once they all have.
    Fetches run BLOCKS_IN_FLIGHT blocks ahead, at least one visit: a visit's fetches are posted
    when the visit that many blocks before it is asked for, after the caller's work on the
    visit before that was queued."""
    groups = step_groups(ring.size, steps_per_visit)
    ahead = max(1, -(-BLOCKS_IN_FLIGHT // steps_per_visit))
    in_flight = collections.deque()

    def post(visit: int) -> None:
        if visit < len(groups):
            buffer, recvs = receive(groups[visit])
            pending = [req for step, into in zip(groups[visit], recvs) for req in ring.fetch(step, send(step), into)]
            in_flight.append((buffer, pending))

    for visit in range(1, ahead + 1):
        post(visit)
    yield groups[0], None
    for visit in range(1, len(groups)):
        buffer, pending = in_flight.popleft()
        post(visit + ahead)
        wait(pending)
        yield groups[visit], buffer


def _fetched(ring: Ring, local: torch.Tensor):
    """`(owner, block)` at every step of the direct walk, one block per visit, the local block
    first; the caller is done with each block before it asks for the next."""

    def receive(steps):
        block = torch.empty_like(local)
        return block, [[block]]

    for (step,), block in _fetched_together(ring, lambda step: [local], receive, 1):
        yield ring.owner(step), local if block is None else block


def _walk(ring: Ring, local: torch.Tensor, schedule: str):
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {SCHEDULES}")
    return _fetched(ring, local) if schedule == "direct" else _passed_on(ring, local)


def ring_visit(
    ring: Ring, local: torch.Tensor, visit: Callable[[int, torch.Tensor], None], *, schedule: str = "direct"
) -> None:
    """Call `visit(owner, block)` once for every rank's block, the local one first, in the walk
    of `schedule` (`SCHEDULES`)."""
    for owner, block in _walk(ring, local, schedule):
        visit(owner, block)


def ring_visit_sending_home(
    ring: Ring,
    send: Callable[[int], list],
    receive: Callable[[tuple], tuple],
    visit: Callable[[tuple, object], list],
    expected: Callable[[int, int], list],
    arrived: Callable[[list], None],
    *,
    steps_per_visit: int = 1,
) -> None:
    """The direct walk in visits of `steps_per_visit` blocks (`step_groups`; `send` and
    `receive` as `_fetched_together` takes them). `visit(steps, buffer)` returns, for each of
    `steps`, this rank's partial gradients for that step's block as parts `(rows, tensors)` (see
    `Ring.send_home`); buffer is None for the own block, which the caller holds. The own
    block's parts go to `arrived(parts)` at once; the others are sent to their owner, and what
    the other ranks computed for this rank's block (`expected(visitor, step)`: empty parts
    shaped as what rank `visitor` sends at `step`) goes to `arrived` one visit after it was
    posted, so waiting for it never holds up the block compute queued before the wait."""
    in_flight = []

    def land() -> None:
        for received, pending, _sent in in_flight:
            wait(pending)
            arrived(received)
        in_flight.clear()

    for steps, buffer in _fetched_together(ring, send, receive, steps_per_visit):
        parts_by_step = visit(steps, buffer)
        land()
        for step, parts in zip(steps, parts_by_step):
            if step == 0:
                arrived(parts)
            else:
                visitor = ring.visitor(step)
                # The sent parts stay referenced until their requests are waited on.
                in_flight.append((*ring.send_home(step, parts, expected(visitor, step)), parts))
    land()


def ring_visit_and_reduce(
    ring: Ring,
    local: torch.Tensor,
    visit: Callable[[int, torch.Tensor, Callable[[], torch.Tensor | None]], torch.Tensor | None],
    zeros: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Like the neighbour `ring_visit`, but `visit(owner, block, arrived)` adds this rank's
    partial gradient for the owner's block and returns the buffer to pass on. `arrived()` waits
    for and returns the partials of the ranks that visited the block before (None at the first
    step, when nothing has arrived yet): the visit adds into it in place, or returns a fresh
    buffer shaped like `zeros()` if it got None, or returns None when it adds nothing. Returns
    the sum over all ranks of the partials for the local block.

    Adding into the arrived buffer, rather than summing a partial of one's own into it, saves
    two passes over a float32 tensor the size of the block per step: the zero fill and the sum.
    """
    carried = carried_pending = None

    def arrived() -> torch.Tensor | None:
        nonlocal carried_pending
        if carried_pending is not None:
            wait(carried_pending)
            carried_pending = None
        return carried

    current = local
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            incoming, pending = ring.exchange(current, BLOCK_TAG)
        partial = visit(ring.owner(step), current, arrived)
        if partial is None:
            # The visit added nothing: what arrived goes on as it came.
            partial = arrived()
            if partial is None:
                partial = zeros()
        if ring.size == 1:
            return partial
        # This rank is done with what arrived (it was received into `carried`): the next
        # receive gets a fresh buffer.
        carried, carried_pending = ring.exchange(partial, GRAD_TAG)
        if not last:
            wait(pending)
            current = incoming
    return arrived()


def add_into(arrived: torch.Tensor | None, partial: torch.Tensor) -> torch.Tensor:
    """`arrived + partial`, in place where a buffer arrived: the usual body of a visit of
    `ring_visit_and_reduce` whose partial is computed whole."""
    return partial if arrived is None else arrived.add_(partial)


# torch 2.13 renamed all_gather_into_tensor; older releases (the GPU image's 2.11) lack the new name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """`[W, *local.shape]`: every rank's `local`, indexed by group rank (one collective)."""
    world = dist.get_world_size(group)
    gathered = torch.empty((world * local.size(0), *local.shape[1:]), dtype=local.dtype, device=local.device)
    _all_gather_single(gathered, local.contiguous(), group=group)
    return gathered.view(world, *local.shape)

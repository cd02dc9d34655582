"""How a layout cuts a global sequence into equal pieces and hands them to ranks.

This is the single source of truth for layouts: `lightning_seqpar.layout` (sharding batches) and
the attention ops (which keys a query may see under a causal mask) both read it, so the two can
never disagree about where a token sits in the global sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(map(repr, LAYOUTS))}")


def pieces_per_rank(layout: str) -> int:
    check_layout(layout)
    return 1 if layout == "contiguous" else 2


def rank_pieces(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """Global indices of the pieces that `rank` holds, in local order.

    contiguous: W pieces, rank r holds piece r.
    zigzag:     2W pieces, rank r holds pieces r and 2W-1-r (balances causal work).
    """
    check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of size {world_size}")
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def required_multiple(world_size: int, layout: str) -> int:
    """The global sequence length must be a multiple of this for `layout` over `world_size` ranks."""
    return world_size * pieces_per_rank(layout)


@dataclass(frozen=True)
class BlockTask:
    """One attention call of a ring step: local query rows `q` attend to local key rows `k` of
    the visiting block (slices along the sequence dim); `causal` means the square causal mask."""

    q: slice
    k: slice
    causal: bool


def causal_step_tasks(
    q_rank: int, kv_rank: int, world_size: int, local_len: int, layout: str, causal: bool
) -> list[BlockTask]:
    """The attention calls that queries of `q_rank` make on keys of `kv_rank`.

    Empty when every (query, key) pair is masked: that step is skipped, not computed. Pieces of
    different ranks never overlap, so off-diagonal piece pairs are either fully visible or fully
    masked; query pieces that see the same key pieces share one call.
    """
    whole = slice(0, local_len)
    if not causal:
        return [BlockTask(whole, whole, False)]
    if q_rank == kv_rank:
        # Both layouts keep a rank's own positions increasing, so the square causal mask over
        # the local chunk is exactly the global causal mask restricted to it.
        return [BlockTask(whole, whole, True)]
    q_pieces = rank_pieces(q_rank, world_size, layout)
    k_pieces = rank_pieces(kv_rank, world_size, layout)
    piece_len = local_len // len(q_pieces)
    tasks: list[BlockTask] = []
    for qi, qp in enumerate(q_pieces):
        visible = [ki for ki, kp in enumerate(k_pieces) if kp < qp]
        if not visible:
            continue
        # Visible key pieces are contiguous in local order for both layouts.
        k_slice = slice(visible[0] * piece_len, (visible[-1] + 1) * piece_len)
        q_slice = slice(qi * piece_len, (qi + 1) * piece_len)
        if tasks and tasks[-1].k == k_slice and tasks[-1].q.stop == q_slice.start:
            tasks[-1] = BlockTask(slice(tasks[-1].q.start, q_slice.stop), k_slice, False)
        else:
            tasks.append(BlockTask(q_slice, k_slice, False))
    return tasks


def local_positions(rank: int, world_size: int, local_len: int, layout: str, device=None):
    """Global positions (int64 `[local_len]`) of the tokens that `rank` holds."""
    pieces = rank_pieces(rank, world_size, layout)
    piece_len = local_len // len(pieces)
    return torch.cat([torch.arange(p * piece_len, (p + 1) * piece_len, device=device) for p in pieces])


@dataclass(frozen=True)
class Segment:
    """Key rows of one visiting block inside a visit's buffer: block `block` (its index in the
    visit's steps) has its local rows `local` at the buffer's rows `buffer`."""

    block: int
    local: slice
    buffer: slice


@dataclass(frozen=True)
class VisitCall:
    """One attention call of a visit of several blocks: local query rows `q` attend to the
    buffer's rows `k`, which hold `segments`; `causal` means the square causal mask."""

    q: slice
    k: slice
    causal: bool
    segments: tuple[Segment, ...]


def buffer_piece_orders(blocks: int, layout: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The ways a visit may lay out its blocks' pieces in its buffer, as `(block, piece)` of
    each piece-sized range in order:
    - block by block, each block as it lies;
    - every block's first piece, then the other pieces of the blocks from last to first. Under
      zigzag a rank reads only the first piece of a block whose owner comes before it, and a
      walk meets those owners first: so the first pieces of such blocks lie side by side, and
      so does a whole block that follows a first-piece one."""
    pieces = pieces_per_rank(layout)
    by_block = tuple((b, p) for b in range(blocks) for p in range(pieces))
    first_pieces_first = tuple([(b, 0) for b in range(blocks)]
                               + [(b, p) for b in reversed(range(blocks)) for p in range(1, pieces)])
    return (by_block,) if first_pieces_first == by_block else (by_block, first_pieces_first)


def _calls_in_order(rank, steps, world_size, local_len, layout, causal, order) -> tuple[VisitCall, ...]:
    piece_len = local_len // pieces_per_rank(layout)
    where = {slot: i * piece_len for i, slot in enumerate(order)}
    calls: list[VisitCall] = []
    for block, step in enumerate(steps):
        for task in causal_step_tasks(rank, (rank - step) % world_size, world_size, local_len, layout, causal):
            segments: list[Segment] = []
            for piece in range(task.k.start // piece_len, -(-task.k.stop // piece_len)):
                start = where[block, piece]
                seg = Segment(block, slice(piece * piece_len, (piece + 1) * piece_len), slice(start, start + piece_len))
                last = segments[-1] if segments else None
                if last is not None and last.buffer.stop == seg.buffer.start and last.local.stop == seg.local.start:
                    segments[-1] = Segment(block, slice(last.local.start, seg.local.stop),
                                           slice(last.buffer.start, seg.buffer.stop))
                else:
                    segments.append(seg)
            calls += [VisitCall(task.q, seg.buffer, task.causal, (seg,)) for seg in segments]
    calls.sort(key=lambda c: (c.q.start, c.q.stop, c.k.start))
    merged: list[VisitCall] = []
    for call in calls:
        last = merged[-1] if merged else None
        if last is not None and not (last.causal or call.causal) and last.q == call.q and last.k.stop == call.k.start:
            merged[-1] = VisitCall(call.q, slice(last.k.start, call.k.stop), False, last.segments + call.segments)
        else:
            merged.append(call)
    return tuple(merged)


def buffer_rows(calls) -> int:
    """The rows of a visit's buffer that its calls read: up to the last one (0 for none)."""
    return max((seg.buffer.stop for call in calls for seg in call.segments), default=0)


def visit_plan(rank: int, steps: tuple[int, ...], world_size: int, local_len: int, layout: str,
               causal: bool) -> tuple[tuple[tuple[int, int], ...], tuple[VisitCall, ...]]:
    """How `rank` visits the blocks of `steps` (owners rank - step) in one buffer: the order of
    their pieces in it (one of `buffer_piece_orders`) and the attention calls. Tasks of
    `causal_step_tasks` whose key rows lie side by side in the buffer and that share their
    query rows are one call: a longer call amortises what a block kernel's backward spends per
    call on the query rows. A task whose pieces don't lie side by side becomes one call per
    piece. Of the orders, the one with the fewest calls wins, then the fewest segments (each
    one transfer, and one partial gradient to send and sum), then the shortest buffer (the rows
    up to the last one read)."""
    plans = [(order, _calls_in_order(rank, steps, world_size, local_len, layout, causal, order))
             for order in buffer_piece_orders(len(steps), layout)]

    def cost(plan):
        return len(plan[1]), sum(len(call.segments) for call in plan[1]), buffer_rows(plan[1])

    return min(plans, key=cost)

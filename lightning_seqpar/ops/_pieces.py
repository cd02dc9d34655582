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

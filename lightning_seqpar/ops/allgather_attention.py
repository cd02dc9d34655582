"""All-gather attention: exact attention over a sequence cut across a group, in a few fused
kernel calls per rank.

Every rank all-gathers the K/V of the whole group once (one collective), puts them in global
order, and computes its local queries against them: one fused block-kernel call without a
causal mask, and under a causal mask at most two per query piece (the keys of all earlier pieces
in one call, the piece's own keys with the square causal mask in another), merged. The backward
gathers K/V again, computes dQ locally and the partial dK/dV of every gathered row, and one
reduce-scatter (summed in float32, float64 for float64 inputs) returns each rank's dK/dV to it.

When to use it: short chunks (about 1K-4K tokens per rank), where the ring's launch cost (one
fused call per pair of query and key pieces, per ring step) outweighs its compute. The
communication volume is the ring's (every rank receives the other ranks' K/V in the forward and
again in the backward, and the dK/dV partials travel once), but none of it overlaps compute:
at long chunks the ring, which hides its transfers behind its block calls, wins.

Memory: what is saved for the backward is O(L_local), as for the ring (q, k, v, out, lse and
the gathered key padding mask, a few bytes per global token). The gathered K/V, L x Hkv x D per
rank for each of K and V, exist only transiently, in the forward and again in the backward, and
so do the backward's float32 dK/dV for all L rows (and their rank-major copy that the
reduce-scatter sends); with grouped-query heads, one call's keys and values are also expanded to
the Hq query heads for the kernel. Its transient peak is therefore several times the ring's.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from lightning_seqpar.ops._blocks import RowRanges, backward_rows, block_forward, finish_lse_, key_bias, row_view
from lightning_seqpar.ops._comm import Ring, all_gather_rows
from lightning_seqpar.ops._common import expand_heads, gather_key_padding_masks, lse_attention_function, prepare, reduce_heads, stack_kv
from lightning_seqpar.ops._kernels import accumulation_dtype, head_expansion, select_block_kernel
from lightning_seqpar.ops._merge import MergedOutput, SummedRows
from lightning_seqpar.ops._pieces import BlockTask, pieces_per_rank, rank_pieces

# torch 2.13 renamed reduce_scatter_tensor (the old name warns); the GPU image's 2.11 lacks the new name.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_kv(kv: torch.Tensor, ring: Ring) -> torch.Tensor:
    """`[W, *kv.shape]`: every rank's stacked K/V, indexed by group rank (one all-gather)."""
    if ring.size == 1:
        return kv.unsqueeze(0)
    return all_gather_rows(kv, ring.group)


def reduce_scatter_grads(partials: torch.Tensor, ring: Ring) -> torch.Tensor:
    """`partials[r]` is this rank's share of rank r's gradient; returns the sum over all ranks of
    their shares of this rank's gradient, `partials.shape[1:]` (one reduce-scatter)."""
    if ring.size == 1:
        return partials[0]
    mine = torch.empty(partials.shape[1:], dtype=partials.dtype, device=partials.device)
    _reduce_scatter_single(mine, partials.flatten(0, 1), group=ring.group)
    return mine


# The index tensors are cached per device: building one from a Python list on a GPU is a
# host-to-device copy that waits for the GPU to finish all queued work, at every call.
@functools.lru_cache(maxsize=64)
def _piece_sources(world_size: int, layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each global piece in order: the group rank that holds it, and its index among that
    rank's local pieces."""
    count = world_size * pieces_per_rank(layout)
    owners, slots = [0] * count, [0] * count
    for rank in range(world_size):
        for slot, piece in enumerate(rank_pieces(rank, world_size, layout)):
            owners[piece], slots[piece] = rank, slot
    return torch.tensor(owners, device=device), torch.tensor(slots, device=device)


@functools.lru_cache(maxsize=64)
def _held_pieces(world_size: int, layout: str, device: torch.device) -> torch.Tensor:
    """`[W, n]`: the global pieces each group rank holds, in local order."""
    return torch.tensor([rank_pieces(r, world_size, layout) for r in range(world_size)], device=device)


def _to_global_order(gathered: torch.Tensor, seq_dim: int, layout: str) -> torch.Tensor:
    """`gathered` is `[W, ...]`, rank-major, with each rank's local sequence at `seq_dim`;
    returns the same tokens without the rank dim, the global sequence at `seq_dim - 1`, in
    global order (one indexing kernel)."""
    world_size, local_len = gathered.size(0), gathered.size(seq_dim)
    per_rank = pieces_per_rank(layout)
    # [W, ..., n, P, ...] -> [..., W, n, P, ...]: the rank dim beside the local piece dim, so
    # one advanced index over both picks the pieces in global order.
    pieces = gathered.unflatten(seq_dim, (per_rank, local_len // per_rank)).movedim(0, seq_dim - 1)
    owners, slots = _piece_sources(world_size, layout, gathered.device)
    in_order = pieces[(slice(None),) * (seq_dim - 1) + (owners, slots)]
    return in_order.flatten(seq_dim - 1, seq_dim)


def _to_rank_major(x: torch.Tensor, world_size: int, layout: str) -> torch.Tensor:
    """Inverse of `_to_global_order` for `[2, B, H, L, D]`: `[W, n, 2, B, H, P, D]`, rank r's
    local pieces at `[r]`, contiguous as a reduce-scatter sends it."""
    per_rank = pieces_per_rank(layout)
    pieces = x.unflatten(3, (world_size * per_rank, -1)).movedim(3, 0)
    return pieces[_held_pieces(world_size, layout, x.device)]


def _gathered_kv(k: torch.Tensor, v: torch.Tensor, ring: Ring, layout: str) -> torch.Tensor:
    """The whole group's K and V, `[2, B, Hkv, L, D]`, in global sequence order."""
    return _to_global_order(all_gather_kv(stack_kv(k, v), ring), 4, layout)


def _global_key_mask(mask: torch.Tensor | None, ring: Ring, layout: str) -> torch.Tensor | None:
    """The whole group's key padding mask, `[B, L]`, in global sequence order."""
    masks = gather_key_padding_masks(mask, ring)
    return None if masks is None else _to_global_order(masks, 2, layout)


def _calls(rank: int, world_size: int, local_len: int, layout: str, causal: bool) -> list[BlockTask]:
    """The kernel calls of this rank's queries: `q` slices local query rows, `k` slices the
    gathered keys (global order)."""
    if not causal:
        return [BlockTask(slice(0, local_len), slice(0, local_len * world_size), False)]
    pieces = rank_pieces(rank, world_size, layout)
    piece_len = local_len // len(pieces)
    calls = []
    for slot, piece in enumerate(pieces):
        rows = slice(slot * piece_len, (slot + 1) * piece_len)
        # Positions rise within a piece, so its own keys take the square causal mask; every key
        # of an earlier piece is visible, and in global order they form one prefix.
        calls.append(BlockTask(rows, slice(piece * piece_len, (piece + 1) * piece_len), True))
        if piece > 0:
            calls.append(BlockTask(rows, slice(0, piece * piece_len), False))
    return calls


def _key_rows(x: torch.Tensor, rows: slice, groups: int) -> torch.Tensor:
    """Rows of the gathered keys or values for one call, with the query heads' count."""
    return expand_heads(row_view(x, rows), groups)


def allgather_attention_forward(q, k, v, ring: Ring, key_mask, *, causal, scale, layout):
    """Returns the local output (dtype of q) and its lse (`[B, Hq, L_local]`, float32/64; +inf
    on rows that see no key at all, so their backward is zero). `key_mask`: `[B, L]`, global
    order, or None."""
    kv = _gathered_kv(k, v, ring, layout)
    kernel = select_block_kernel(q, key_mask is not None)
    groups = head_expansion(kernel, q, k)
    merged = MergedOutput(q, kernel)
    q_rows = RowRanges(q)
    for call in _calls(ring.rank, ring.size, q.size(2), layout, causal):
        block_out, block_lse = block_forward(
            kernel, q_rows(call.q), _key_rows(kv[0], call.k, groups), _key_rows(kv[1], call.k, groups),
            scale=scale, causal=call.causal, key_mask=None if key_mask is None else key_mask[:, call.k],
        )
        merged.add(call.q, block_out, block_lse)
    del kv
    out, lse = merged.result()
    finish_lse_(lse)
    return out, lse


def allgather_attention_backward(dout, q, k, v, out, lse, ring: Ring, key_mask, *, causal, scale, layout):
    acc = accumulation_dtype(q.dtype)
    # Gathered again rather than saved: saving it would make activation memory O(L).
    kv = _gathered_kv(k, v, ring, layout)
    kernel = select_block_kernel(q, key_mask is not None)
    groups = head_expansion(kernel, q, k)
    dq = SummedRows(q, kernel)
    # Zeros: under a causal mask this rank's queries see no key after its own pieces.
    dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
    q_rows, lse_rows, dout_rows, out_rows = backward_rows(kernel, q, lse, dout, out)
    calls = _calls(ring.rank, ring.size, q.size(2), layout, causal)
    for call in calls:
        call_mask = None if key_mask is None else key_mask[:, call.k]
        dq_b, dk_b, dv_b = kernel.backward(
            dout_rows(call.q), q_rows(call.q), _key_rows(kv[0], call.k, groups), _key_rows(kv[1], call.k, groups),
            out_rows(call.q), lse_rows(call.q),
            scale=scale, causal=call.causal, bias=key_bias(call_mask, q.dtype),
        )
        dq.add(call.q, dq_b)
        row_view(dkv[0], call.k).add_(reduce_heads(dk_b, groups))
        row_view(dkv[1], call.k).add_(reduce_heads(dv_b, groups))
    del kv
    # [n, 2, B, Hkv, P, D]: this rank's local pieces, summed over every rank's queries.
    mine = reduce_scatter_grads(_to_rank_major(dkv, ring.size, layout), ring)
    dk, dv = mine.movedim(0, 3).flatten(3, 4)
    return dq.result(), dk.to(k.dtype), dv.to(v.dtype)


_AllGatherAttention = lse_attention_function(
    "_AllGatherAttention", _global_key_mask, allgather_attention_forward, allgather_attention_backward
)


def allgather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Exact attention over a sequence cut across the ranks of `group`, from one all-gather of
    K/V; same contract as `ring_attention`.

    q: `[B, Hq, L_local, D]`, k, v: `[B, Hkv, L_local, D]` with Hq % Hkv == 0 (K/V are gathered
    with Hkv heads). `layout` says how the global sequence was cut across the group's ranks (rank
    order); `key_padding_mask` `[B, L_local]` bool, True = a real token, sharded like k.
    Returns the local output `[B, Hq, L_local, D]`. Rows that see no real key give zeros, as
    `F.scaled_dot_product_attention` does.
    """
    q, k, v, scale = prepare(q, k, v, group=group, scale=scale, layout=layout, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return _AllGatherAttention.apply(q, k, v, key_padding_mask, group, causal, scale, layout)

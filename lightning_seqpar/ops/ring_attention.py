"""Ring attention with online softmax: O(L_local) memory per rank.

Each rank keeps its queries; key/value blocks travel around the ring. At every step one fused
block kernel returns (out_b, lse_b) for the visiting block, and the blocks' results are merged
in float32 (a few at a time: `_merge.MergedOutput`). The backward walks the ring again: each
block's gradient is computed from the *global* out and lse, dQ accumulates at home, and dK/dV
ride a second ring behind their block until they reach their owner. No tensor spans
L_local x L.
"""

from __future__ import annotations

import functools

import torch

from lightning_seqpar.ops._blocks import RowRanges, backward_rows, block_forward, finish_lse_, key_bias, row_view
from lightning_seqpar.ops._comm import Ring, ring_visit, ring_visit_and_reduce
from lightning_seqpar.ops._common import expand_heads, gather_key_padding_masks, lse_attention_function, prepare, reduce_heads
from lightning_seqpar.ops._kernels import accumulation_dtype, head_expansion, select_block_kernel
from lightning_seqpar.ops._merge import MergedOutput, SummedRows
from lightning_seqpar.ops._pieces import causal_step_tasks

@functools.lru_cache(maxsize=4096)
def _step_tasks(rank: int, owner: int, size: int, local_len: int, layout: str, causal: bool) -> tuple:
    # Cached: the ring asks for the same few plans at every step of every layer.
    return tuple(causal_step_tasks(rank, owner, size, local_len, layout, causal))


def _block_tasks(ring: Ring, owner: int, local_len: int, layout: str, causal: bool) -> tuple:
    return _step_tasks(ring.rank, owner, ring.size, local_len, layout, causal)


def ring_attention_forward(q, k, v, ring: Ring, masks, *, causal, scale, layout):
    """Returns the local output (dtype of q) and its lse (`[B, Hq, L_local]`, float32/64;
    +inf on rows that see no key at all, so their backward is zero)."""
    local_len = q.size(2)
    kernel = select_block_kernel(q, masks is not None)
    groups = head_expansion(kernel, q, k)
    merged = MergedOutput(q, kernel)
    q_rows = RowRanges(q)

    def visit(owner: int, kv: torch.Tensor) -> None:
        for task in _block_tasks(ring, owner, local_len, layout, causal):
            block_out, block_lse = block_forward(
                kernel, q_rows(task.q),
                expand_heads(row_view(kv[0], task.k), groups),
                expand_heads(row_view(kv[1], task.k), groups),
                scale=scale, causal=task.causal, key_mask=None if masks is None else masks[owner][:, task.k],
            )
            merged.add(task.q, block_out, block_lse)

    ring_visit(ring, torch.stack([k, v]), visit)
    out, lse = merged.result()
    finish_lse_(lse)
    return out, lse


def ring_attention_backward(dout, q, k, v, out, lse, ring: Ring, masks, *, causal, scale, layout):
    local_len = q.size(2)
    acc = accumulation_dtype(q.dtype)
    kernel = select_block_kernel(q, masks is not None)
    groups = head_expansion(kernel, q, k)
    dq = SummedRows(q, kernel)
    q_rows, lse_rows, dout_rows, out_rows = backward_rows(kernel, q, lse, dout, out)

    def zeros() -> torch.Tensor:
        return torch.zeros((2, *k.shape), dtype=acc, device=k.device)

    def visit(owner: int, kv: torch.Tensor, arrived) -> torch.Tensor | None:
        dkv = None
        for task in _block_tasks(ring, owner, local_len, layout, causal):
            key_mask = None if masks is None else masks[owner][:, task.k]
            dq_b, dk_b, dv_b = kernel.backward(
                dout_rows(task.q), q_rows(task.q),
                expand_heads(row_view(kv[0], task.k), groups),
                expand_heads(row_view(kv[1], task.k), groups),
                out_rows(task.q), lse_rows(task.q),
                scale=scale, causal=task.causal, bias=key_bias(key_mask, q.dtype),
            )
            dk_b, dv_b = reduce_heads(dk_b, groups), reduce_heads(dv_b, groups)
            dq.add(task.q, dq_b)
            if owner == ring.rank:
                # Nothing has been summed yet for this block's dK/dV: copy, don't add.
                dkv = torch.empty((2, *k.shape), dtype=acc, device=k.device)
                dkv[0].copy_(dk_b)
                dkv[1].copy_(dv_b)
                continue
            if dkv is None:
                # The other ranks' partials for this block, received while the kernel above ran.
                dkv = arrived()
            row_view(dkv[0], task.k).add_(dk_b)
            row_view(dkv[1], task.k).add_(dv_b)
        return dkv

    dkv = ring_visit_and_reduce(ring, torch.stack([k, v]), visit, zeros)
    return dq.result(), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _rank_masks(key_padding_mask, ring: Ring, layout: str):
    return gather_key_padding_masks(key_padding_mask, ring)


_RingAttention = lse_attention_function("_RingAttention", _rank_masks, ring_attention_forward, ring_attention_backward)


def ring_attention(
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
    """Exact attention over a sequence cut across the ranks of `group`, O(L_local) memory.

    q: `[B, Hq, L_local, D]`, k, v: `[B, Hkv, L_local, D]` with Hq % Hkv == 0 (K/V travel with
    Hkv heads). `layout` says how the global sequence was cut across the group's ranks (rank
    order); `key_padding_mask` `[B, L_local]` bool, True = a real token, sharded like k.
    Returns the local output `[B, Hq, L_local, D]`. Rows that see no real key give zeros, as
    `F.scaled_dot_product_attention` does.
    """
    q, k, v, scale = prepare(q, k, v, group=group, scale=scale, layout=layout, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return _RingAttention.apply(q, k, v, key_padding_mask, group, causal, scale, layout)

"""Ring attention with online softmax: O(L_local) memory per rank.

Each rank keeps its queries; every rank's key/value block visits every rank, fetched straight
from its owner two steps before it is used (`_comm.ring_visit`'s direct walk). At every step
one fused block kernel returns (out_b, lse_b) for the visiting block, and the blocks' results
are merged in float32 (a few at a time: `_merge.MergedOutput`). The backward walks the ring
again: each block's gradient is computed from the *global* out and lse, dQ accumulates at
home, and each rank's dK/dV partials for the visiting block are sent straight to its owner,
which sums them a few at a time (`_merge.SummedRows`; `_comm.ring_visit_sending_home`). No
tensor spans L_local x L.
"""

from __future__ import annotations

import functools

import torch

from lightning_seqpar.ops._blocks import RowRanges, backward_rows, block_forward, finish_lse_, key_bias, row_view
from lightning_seqpar.ops._comm import Ring, ring_visit, ring_visit_sending_home
from lightning_seqpar.ops._common import expand_heads, gather_key_padding_masks, lse_attention_function, prepare, reduce_heads, stack_kv
from lightning_seqpar.ops._graphs import graphed
from lightning_seqpar.ops._kernels import block_grad_dtype, head_expansion, select_block_kernel
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

    ring_visit(ring, stack_kv(k, v), visit)
    out, lse = merged.result()
    finish_lse_(lse)
    return out, lse


def ring_attention_backward(dout, q, k, v, out, lse, ring: Ring, masks, *, causal, scale, layout):
    local_len = q.size(2)
    kernel = select_block_kernel(q, masks is not None)
    groups = head_expansion(kernel, q, k)
    # Partials travel in the dtype the kernel returns them in and are summed at home in the
    # accumulation dtype, as if they had been added there one by one.
    wire = block_grad_dtype(kernel, q.dtype)
    dq, dk, dv = SummedRows(q, kernel), SummedRows(k, kernel), SummedRows(v, kernel)
    q_rows, lse_rows, dout_rows, out_rows = backward_rows(kernel, q, lse, dout, out)

    def visit(owner: int, kv: torch.Tensor) -> list:
        parts = []
        for task in _block_tasks(ring, owner, local_len, layout, causal):
            key_mask = None if masks is None else masks[owner][:, task.k]
            dq_b, dk_b, dv_b = kernel.backward(
                dout_rows(task.q), q_rows(task.q),
                expand_heads(row_view(kv[0], task.k), groups),
                expand_heads(row_view(kv[1], task.k), groups),
                out_rows(task.q), lse_rows(task.q),
                scale=scale, causal=task.causal, bias=key_bias(key_mask, q.dtype),
            )
            dq.add(task.q, dq_b)
            parts.append((task.k, (reduce_heads(dk_b, groups).to(wire), reduce_heads(dv_b, groups).to(wire))))
        return parts

    def expected(visitor: int) -> list:
        """Empty parts shaped as the partials that `visitor` computes for this rank's block."""
        def empty(rows: slice) -> torch.Tensor:
            return torch.empty((k.size(0), k.size(1), rows.stop - rows.start, k.size(3)), dtype=wire, device=k.device)

        tasks = _step_tasks(visitor, ring.rank, ring.size, local_len, layout, causal)
        return [(task.k, (empty(task.k), empty(task.k))) for task in tasks]

    def arrived(parts: list) -> None:
        for rows, (dk_part, dv_part) in parts:
            dk.add(rows, dk_part)
            dv.add(rows, dv_part)

    ring_visit_sending_home(ring, stack_kv(k, v), visit, expected, arrived)
    return dq.result(), dk.result(), dv.result()


def _rank_masks(key_padding_mask, ring: Ring, layout: str):
    return gather_key_padding_masks(key_padding_mask, ring)


_RingAttention = lse_attention_function("_RingAttention", _rank_masks, graphed(ring_attention_forward), graphed(ring_attention_backward))


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

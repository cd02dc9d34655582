"""Ring attention with online softmax: O(L_local) memory per rank.

Each rank keeps its queries; key/value blocks travel around the ring. At every step one fused
block kernel returns (out_b, lse_b) for the visiting block, and the running (out, lse) absorbs
it in float32. The backward walks the ring again: each block's gradient is computed from the
*global* out and lse, dQ accumulates at home, and dK/dV ride a second ring behind their block
until they reach their owner. No tensor spans L_local x L.
"""

from __future__ import annotations

import functools

import torch

from lightning_seqpar.ops._comm import Ring, ring_visit, ring_visit_and_reduce
from lightning_seqpar.ops._common import expand_heads, gather_key_padding_masks, lse_attention_function, prepare, reduce_heads
from lightning_seqpar.ops._kernels import accumulation_dtype, accumulator_like, forward_output_layout, select_block_kernel
from lightning_seqpar.ops._merge import merge_block_
from lightning_seqpar.ops._pieces import causal_step_tasks

# Stand-in for the lse of "no key seen yet". A finite value keeps the merge free of inf - inf;
# any real lse is larger by ~1e30, so sigmoid weights against it round to exactly 0 or 1.
EMPTY_LSE = -1.0e30


def _key_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive `[B, 1, 1, Lk]` bias from a key padding mask (True = real key)."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, None, None, :]


def _rows_without_keys(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Which query rows of a block see no real key: `[B, 1, Lq or 1]`."""
    if causal:
        return (mask.cumsum(-1) == 0)[:, None, :]
    return (~mask.any(-1))[:, None, None]


@functools.lru_cache(maxsize=4096)
def _step_tasks(rank: int, owner: int, size: int, local_len: int, layout: str, causal: bool) -> tuple:
    # Cached: the ring asks for the same few plans at every step of every layer.
    return tuple(causal_step_tasks(rank, owner, size, local_len, layout, causal))


def _block_tasks(ring: Ring, owner: int, local_len: int, layout: str, causal: bool) -> tuple:
    return _step_tasks(ring.rank, owner, ring.size, local_len, layout, causal)


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    whole = rows.start == 0 and rows.stop == x.size(2)
    return x if whole else x[:, :, rows].contiguous()


def _view(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of `x` along its sequence dim (2), as a view: `narrow` costs a fraction of the
    CPU time of `x[:, :, rows]`, and the ring makes several per step."""
    return x.narrow(2, rows.start, rows.stop - rows.start)


class _RowCopies:
    """Row ranges of one tensor of the local rows, as the block kernels take them (`prepare`
    of each range): each range is prepared once per call, however many ring steps use it
    (under zigzag, every step uses one of the same two halves)."""

    def __init__(self, x: torch.Tensor, prepare=torch.Tensor.contiguous):
        self.x, self._prepare, self._copies = x, prepare, {}

    def __call__(self, rows: slice) -> torch.Tensor:
        if rows.start == 0 and rows.stop == self.x.size(2):
            return self.x
        key = (rows.start, rows.stop)
        if key not in self._copies:
            self._copies[key] = self._prepare(_view(self.x, rows))
        return self._copies[key]


def ring_attention_forward(q, k, v, ring: Ring, masks, *, causal, scale, layout):
    """Returns the local output (dtype of q) and its lse (`[B, Hq, L_local]`, float32/64;
    +inf on rows that see no key at all, so their backward is zero)."""
    batch, heads, local_len, _ = q.shape
    groups = heads // k.size(1)
    acc = accumulation_dtype(q.dtype)
    kernel = select_block_kernel(q, masks is not None)
    # Filled by the first visit (the rank's own block, one call over all its rows), then merged
    # into. Stored as the kernel stores its outputs, so that copy and the merges stream.
    out = accumulator_like(q, acc, kernel)
    lse = torch.empty((batch, heads, local_len), dtype=acc, device=q.device)
    q_rows = _RowCopies(q)

    def visit(owner: int, kv: torch.Tensor) -> None:
        for task in _block_tasks(ring, owner, local_len, layout, causal):
            key_mask = None if masks is None else masks[owner][:, task.k]
            block_out, block_lse = kernel.forward(
                q_rows(task.q),
                expand_heads(_rows(kv[0], task.k), groups),
                expand_heads(_rows(kv[1], task.k), groups),
                scale=scale, causal=task.causal, bias=_key_bias(key_mask, q.dtype),
            )
            if key_mask is not None:
                empty = _rows_without_keys(key_mask, task.causal)
                block_lse = block_lse.masked_fill(empty, EMPTY_LSE)
                block_out = block_out.masked_fill(empty.unsqueeze(-1), 0.0)
            if owner == ring.rank:
                out.copy_(block_out)
                lse.copy_(block_lse)
            else:
                merge_block_(_view(out, task.q), _view(lse, task.q), block_out, block_lse)

    ring_visit(ring, torch.stack([k, v]), visit)
    lse.masked_fill_(lse < EMPTY_LSE / 2, float("inf"))
    return out.to(q.dtype), lse


def ring_attention_backward(dout, q, k, v, out, lse, ring: Ring, masks, *, causal, scale, layout):
    local_len = q.size(2)
    groups = q.size(1) // k.size(1)
    acc = accumulation_dtype(q.dtype)
    kernel = select_block_kernel(q, masks is not None)
    # Filled by the first visit (the rank's own block, one call over all rows), then summed into.
    dq = accumulator_like(q, acc, kernel)
    dout, out = (forward_output_layout(t.to(q.dtype), kernel) for t in (dout, out))
    kernel_layout = functools.partial(forward_output_layout, kernel=kernel)
    q_rows, lse_rows = _RowCopies(q), _RowCopies(lse)
    dout_rows, out_rows = _RowCopies(dout, kernel_layout), _RowCopies(out, kernel_layout)

    def zeros() -> torch.Tensor:
        return torch.zeros((2, *k.shape), dtype=acc, device=k.device)

    def visit(owner: int, kv: torch.Tensor, arrived) -> torch.Tensor | None:
        dkv = None
        for task in _block_tasks(ring, owner, local_len, layout, causal):
            key_mask = None if masks is None else masks[owner][:, task.k]
            dq_b, dk_b, dv_b = kernel.backward(
                dout_rows(task.q), q_rows(task.q),
                expand_heads(_rows(kv[0], task.k), groups),
                expand_heads(_rows(kv[1], task.k), groups),
                out_rows(task.q), lse_rows(task.q),
                scale=scale, causal=task.causal, bias=_key_bias(key_mask, q.dtype),
            )
            dk_b, dv_b = reduce_heads(dk_b, groups), reduce_heads(dv_b, groups)
            if owner == ring.rank:
                # Nothing has been summed yet, for dq nor for this block's dK/dV: copy, don't add.
                dq.copy_(dq_b)
                dkv = torch.empty((2, *k.shape), dtype=acc, device=k.device)
                dkv[0].copy_(dk_b)
                dkv[1].copy_(dv_b)
                continue
            _view(dq, task.q).add_(dq_b)
            if dkv is None:
                # The other ranks' partials for this block, received while the kernel above ran.
                dkv = arrived()
            _view(dkv[0], task.k).add_(dk_b)
            _view(dkv[1], task.k).add_(dv_b)
        return dkv

    dkv = ring_visit_and_reduce(ring, torch.stack([k, v]), visit, zeros)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


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

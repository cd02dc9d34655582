"""Ring Self-Attention (RSA), the algorithm of Li et al., "Sequence Parallelism: Long Sequence
Training from System Perspective": the reference, quadratic in memory by design.

Forward, on the rank holding queries Q_n:
  1. pass K around the ring and fill the full score rows S_n = scale * Q_n [K_0 .. K_{W-1}]^T
     (`[L_local x L]`), so the softmax P_n = softmax(S_n) is exact and local;
  2. pass V around the ring: O_n = sum_j P_n[:, j] V_j.

Backward (derived here; every step is checked against one process in tests/ops):
  dV_j = sum_n P_n[:, j]^T dO_n          (partials of every rank, summed at the owner of V_j)
  dP_n[:, j] = dO_n V_j^T                 (V passed around the ring again)
  dS_n = scale * P_n * (dP_n - rowsum(dP_n * P_n))
  dQ_n = sum_j dS_n[:, j] K_j             (K passed around the ring again)
  dK_j = sum_n dS_n[:, j]^T Q_n           (partials summed at the owner of K_j)
The partial gradients of K_j and V_j are *summed* over the ranks. The published implementation
divides dQ, dK and dV by the ring size; that is not the single-device gradient (dQ, for one,
needs no reduction at all), and the tests here show the sums are.
"""

from __future__ import annotations

import torch

from lightning_seqpar.ops._comm import Ring, add_into, ring_visit, ring_visit_and_reduce
from lightning_seqpar.ops._common import gather_key_padding_masks, no_autocast, prepare
from lightning_seqpar.ops._kernels import accumulation_dtype
from lightning_seqpar.ops._pieces import local_positions


def _grouped(x: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, Hq, L, D]` as `[B, Hkv, G, L, D]`: query heads grouped by the K/V head they read."""
    b, h, length, d = x.shape
    return x.to(dtype).reshape(b, kv_heads, h // kv_heads, length, d)


def _columns(owner: int, local_len: int) -> slice:
    """Columns of the full score rows that hold the keys of rank `owner` (rank order)."""
    return slice(owner * local_len, (owner + 1) * local_len)


def rsa_forward(q, k, v, ring: Ring, *, causal, scale, layout, masks):
    """Returns the local output (dtype of q) and the softmax rows `[B, Hkv, G, L_local, L]`."""
    batch, heads, local_len, dim = q.shape
    kv_heads = k.size(1)
    acc = accumulation_dtype(q.dtype)
    q_grouped = _grouped(q, kv_heads, acc)
    scores = torch.empty((batch, kv_heads, heads // kv_heads, local_len, ring.size * local_len), dtype=acc, device=q.device)
    q_pos = local_positions(ring.rank, ring.size, local_len, layout, q.device)

    def fill_scores(owner: int, key: torch.Tensor) -> None:
        block = scores[..., _columns(owner, local_len)]
        block.copy_(torch.matmul(q_grouped, key.to(acc).unsqueeze(2).transpose(-1, -2))).mul_(scale)
        if causal:
            k_pos = local_positions(owner, ring.size, local_len, layout, q.device)
            block.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        if masks is not None:
            block.masked_fill_(~masks[owner][:, None, None, None, :], float("-inf"))

    # The paper's ring: each rank passes on the block it received.
    ring_visit(ring, k.contiguous(), fill_scores, schedule="neighbour")
    probs = torch.softmax(scores, dim=-1)
    # A row whose keys are all masked has no softmax; it attends to nothing (zeros), like SDPA.
    probs.masked_fill_(torch.isneginf(scores.amax(-1, keepdim=True)), 0.0)
    del scores
    out = torch.zeros((batch, kv_heads, heads // kv_heads, local_len, dim), dtype=acc, device=q.device)

    def add_values(owner: int, value: torch.Tensor) -> None:
        out.add_(torch.matmul(probs[..., _columns(owner, local_len)], value.to(acc).unsqueeze(2)))

    ring_visit(ring, v.contiguous(), add_values, schedule="neighbour")
    return out.reshape(q.shape).to(q.dtype), probs


def rsa_backward(dout, q, k, v, probs, ring: Ring, *, scale):
    local_len = q.size(2)
    kv_heads = k.size(1)
    acc = probs.dtype
    dout_grouped = _grouped(dout, kv_heads, acc)

    def zeros() -> torch.Tensor:
        return torch.zeros(k.shape, dtype=acc, device=k.device)

    dprobs = torch.empty_like(probs)

    def value_grads(owner: int, value: torch.Tensor, arrived) -> torch.Tensor:
        cols = _columns(owner, local_len)
        dprobs[..., cols] = torch.matmul(dout_grouped, value.to(acc).unsqueeze(2).transpose(-1, -2))
        return add_into(arrived(), torch.matmul(probs[..., cols].transpose(-1, -2), dout_grouped).sum(2))

    dv = ring_visit_and_reduce(ring, v.contiguous(), value_grads, zeros)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
    dscores.mul_(scale)
    del dprobs
    q_grouped = _grouped(q, kv_heads, acc)
    dq = torch.zeros_like(q_grouped)

    def key_grads(owner: int, key: torch.Tensor, arrived) -> torch.Tensor:
        cols = _columns(owner, local_len)
        dq.add_(torch.matmul(dscores[..., cols], key.to(acc).unsqueeze(2)))
        return add_into(arrived(), torch.matmul(dscores[..., cols].transpose(-1, -2), q_grouped).sum(2))

    dk = ring_visit_and_reduce(ring, k.contiguous(), key_grads, zeros)
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, group, causal, scale, layout):
        ring = Ring(group)
        with no_autocast(q.device):
            masks = gather_key_padding_masks(key_padding_mask, ring)
            out, probs = rsa_forward(q, k, v, ring, causal=causal, scale=scale, layout=layout, masks=masks)
        ctx.save_for_backward(q, k, v, probs)
        ctx.ring, ctx.scale = ring, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs = ctx.saved_tensors
        with no_autocast(q.device):
            dq, dk, dv = rsa_backward(dout, q, k, v, probs, ctx.ring, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def ring_self_attention(
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
    """The paper's Ring Self-Attention over a sequence cut across the ranks of `group`.

    Same arguments and result as `ring_attention`; memory per rank holds the full score rows
    `[B, Hq, L_local, L]`, so it is quadratic in L. Kept as the paper's reference algorithm.
    """
    q, k, v, scale = prepare(q, k, v, group=group, scale=scale, layout=layout, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return _RingSelfAttention.apply(q, k, v, key_padding_mask, group, causal, scale, layout)

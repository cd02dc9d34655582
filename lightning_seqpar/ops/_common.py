"""Pieces shared by both attention algorithms: argument handling, grouped-query heads and the
key padding mask."""

from __future__ import annotations

import math

import torch

from lightning_seqpar.ops._checks import check_attention_inputs
from lightning_seqpar.ops._comm import Ring, all_gather_rows, collective_device


def prepare(q, k, v, *, group, scale, layout, key_padding_mask, dropout_p):
    """Validate one call (on every rank of `group`); return q, k, v as the op computes them
    and the softmax scale.

    Under autocast the inputs are cast to the autocast dtype, as autocast does for
    `F.scaled_dot_product_attention` (e.g. RoPE in float32 beside a bf16 V must not reach the
    ring as mixed dtypes); the op itself then runs with autocast off, so its float32
    accumulation stays float32.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    check_attention_inputs(q, k, v, group=group, layout=layout, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return q, k, v, 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)


def stack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`torch.stack([k, v])`, the block the ring passes around, as a view where V already
    follows K in memory with the same contiguous layout: a CUDA graph's input copies are laid
    out so (`_graphs.input_copies`), which saves the replay a copy of K and V."""
    if (k.shape == v.shape and k.dtype == v.dtype and k.device == v.device and k.is_contiguous() and v.is_contiguous()
            and k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            and v.storage_offset() == k.storage_offset() + k.numel()):
        return k.as_strided((2, *k.shape), (k.numel(), *k.stride()))
    return torch.stack([k, v])


def no_autocast(device: torch.device):
    """The ops' own arithmetic chooses its precision; autocast must not lower it."""
    return torch.autocast(device.type, enabled=False)


def gather_key_padding_masks(mask: torch.Tensor | None, ring: Ring) -> torch.Tensor | None:
    """All ranks' key padding masks, `[W, B, L_local]` bool, indexed by group rank.

    The mask is a few bytes per token, so one all-gather up front is cheaper than sending it
    around the ring with every block.
    """
    if mask is None:
        return None
    if ring.size == 1:
        return mask.unsqueeze(0)
    local = mask.to(device=collective_device(ring.group), dtype=torch.uint8)
    return all_gather_rows(local, ring.group).to(device=mask.device, dtype=torch.bool)


def expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """K/V heads repeated for grouped-query attention, after they have travelled (query head h
    reads key head h // groups, as in SDPA's `enable_gqa`)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reduce_heads(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of `expand_heads`: sum the query heads that shared one K/V head."""
    if groups == 1:
        return dx
    # reshape: a view for any layout whose heads are evenly strided (the ring's backward hands
    # sequence-major gradients here).
    b, h, length, d = dx.shape
    return dx.reshape(b, h // groups, groups, length, d).sum(2)


def lse_attention_function(name: str, gather_masks, forward, backward) -> type[torch.autograd.Function]:
    """The autograd Function of an op that computes the local output and its lse in one pass
    and its gradients from them in another (the ring and the all-gather op):
    `gather_masks(key_padding_mask, ring, layout)` collects what the op needs of the group's
    key padding masks, `forward(q, k, v, ring, masks, *, causal, scale, layout)` returns
    (out, lse) and `backward(dout, q, k, v, out, lse, ring, masks, *, causal, scale, layout)`
    returns (dq, dk, dv). Both run with autocast off: the ops choose their own precision."""

    def forward_(ctx, q, k, v, key_padding_mask, group, causal, scale, layout):
        ring = Ring(group)
        with no_autocast(q.device):
            masks = gather_masks(key_padding_mask, ring, layout)
            out, lse = forward(q, k, v, ring, masks, causal=causal, scale=scale, layout=layout)
        ctx.save_for_backward(q, k, v, out, lse, masks)
        ctx.ring, ctx.causal, ctx.scale, ctx.layout = ring, causal, scale, layout
        return out

    def backward_(ctx, dout):
        q, k, v, out, lse, masks = ctx.saved_tensors
        with no_autocast(q.device):
            dq, dk, dv = backward(dout, q, k, v, out, lse, ctx.ring, masks, causal=ctx.causal, scale=ctx.scale, layout=ctx.layout)
        return dq, dk, dv, None, None, None, None, None

    namespace = {"forward": staticmethod(forward_), "backward": staticmethod(backward_), "__module__": forward.__module__}
    return type(name, (torch.autograd.Function,), namespace)

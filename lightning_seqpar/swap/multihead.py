"""`torch.nn.MultiheadAttention` through the ring, with the module's own parameters.

The projections and the output layer are the module's; only the attention between them runs
over the whole sequence. Attention weights are never materialised (no rank holds a full row of
them), so the second return value is None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_seqpar.swap.context import RingContext
from lightning_seqpar.swap.masks import decode_mha_masks


def check_multihead_attention(module: nn.MultiheadAttention) -> None:
    """Raise, at swap time, for configurations the ring can't reproduce exactly."""
    name = type(module).__name__
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            f"{name} with add_bias_kv=True or add_zero_attn=True appends keys that belong to no "
            f"position of the sequence; sequence parallelism can't place them: build it without"
        )
    if module.dropout:
        raise ValueError(
            f"{name} has attention dropout {module.dropout}, which sequence parallelism can't "
            f"reproduce: build it with dropout=0.0 (for nn.TransformerEncoderLayer, dropout applies "
            f"to self_attn too; set it to 0.0 and add dropout outside the attention if you need it)"
        )


def _projections(module: nn.MultiheadAttention):
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = (None, None, None) if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
    return weights, biases


def multihead_attention_ring_forward(
    module: nn.MultiheadAttention,
    ring: RingContext,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    """The signature of `nn.MultiheadAttention.forward`; query, key and value are local chunks
    of sequences cut in `ring.layout` (key and value the same length as the query)."""
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = (t.unsqueeze(1 if not module.batch_first else 0) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, q_len, _ = query.shape
    k_len = key.size(1)
    if k_len != q_len:
        raise ValueError(
            f"{type(module).__name__} under sequence parallelism needs keys cut like the queries "
            f"(same local length), got {q_len} queries and {k_len} keys: attention to a sequence "
            f"that isn't cut (e.g. encoder memory held whole) is not supported"
        )
    heads, head_dim = module.num_heads, module.head_dim
    real_keys, causal = decode_mha_masks(key_padding_mask, attn_mask, is_causal, batch, heads, q_len, k_len, ring.group)
    (w_q, w_k, w_v), (b_q, b_k, b_v) = _projections(module)

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    q = split_heads(F.linear(query, w_q, b_q))
    k = split_heads(F.linear(key, w_k, b_k))
    v = split_heads(F.linear(value, w_v, b_v))
    dropout_p = module.dropout if module.training else 0.0
    out = ring.attention(q, k, v, causal=causal, key_padding_mask=real_keys, dropout_p=dropout_p)
    out = module.out_proj(out.transpose(1, 2).reshape(batch, q_len, module.embed_dim))
    if not module.batch_first:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(1 if not module.batch_first else 0)
    return out, None

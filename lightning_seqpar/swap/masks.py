"""Reading the masks that attention modules are given into what the ring can apply exactly.

The ring applies two kinds of mask: causal over *global* positions, and a key padding mask
(`[B, L_local]`, True = a real token) that travels with the keys. A model that believes its
chunk is the whole sequence builds its masks over the local chunk; a causal mask built that way
(lower-triangular over local order) means "causal", because every layout keeps a rank's
positions increasing. Anything else (per-head masks, sliding windows, soft biases such as ALiBi)
can't be expressed by the ring and is rejected: silently dropping a mask would train a
different model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

UNSUPPORTED_MASK = (
    "only key-padding masks, causal masks and the two combined can run through the ring "
    "(boolean, or additive with values 0 and -inf); pass is_causal=True plus a key-padding "
    "mask, or plug your module in with lightning_seqpar.register_attention(...)"
)


def allowed_from_additive(mask: torch.Tensor, what: str) -> torch.Tensor:
    """Bool "may attend" from an additive float mask of 0 (attend) and -inf or the dtype's
    lowest value (don't, as Hugging Face builds them)."""
    blocked = torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min / 2)
    if not bool(((mask == 0) | blocked).all()):
        raise ValueError(
            f"{what} holds values other than 0 and -inf (a soft attention bias), which sequence "
            f"parallelism can't apply: {UNSUPPORTED_MASK}"
        )
    return ~blocked


# What a mask says about causality. A chunk with at most its first key real reads the same
# either way, so the ranks of the group settle it together (see `settle_causal`).
FULL, CAUSAL, EITHER = 0, 1, 2
_BAD = 3


def decode_row_mask(allowed: torch.Tensor, batch: int, q_len: int, k_len: int, what: str):
    """`allowed`: `[b, Lq or 1, Lk]` bool, True = may attend (b in (1, batch)).

    Returns `(key_padding_mask [batch, Lk], kind)` with kind FULL (all query rows equal: a key
    mask), CAUSAL (causal combined with a key mask) or EITHER; raises ValueError otherwise.
    """
    if allowed.size(-1) != k_len or allowed.size(-2) not in (1, q_len) or allowed.size(0) not in (1, batch):
        raise ValueError(
            f"{what} of shape {tuple(allowed.shape)} doesn't match {batch} sequences of {q_len} local "
            f"queries and {k_len} local keys: {UNSUPPORTED_MASK}"
        )
    # Under a causal mask the last query sees every key that isn't padding.
    keys = allowed[:, -1, :]
    is_key_mask = allowed.size(-2) == 1 or bool((allowed == keys[:, None, :]).all())
    is_causal = False
    if q_len == k_len and allowed.size(-2) == q_len:
        tril = torch.ones(q_len, k_len, dtype=torch.bool, device=allowed.device).tril()
        is_causal = bool((allowed == (tril & keys[:, None, :])).all())
    if not (is_key_mask or is_causal):
        raise ValueError(f"{what} is a dense mask that is neither causal nor key padding: {UNSUPPORTED_MASK}")
    kind = EITHER if is_key_mask and is_causal else CAUSAL if is_causal else FULL
    return keys.expand(batch, k_len).contiguous(), kind


def settle_causal(local, group) -> bool:
    """Agree, over the ranks of `group`, whether a decoded mask is causal.

    `local` is this rank's kind, or the ValueError its decoding raised. Every rank raises when
    any rank's mask was unusable or the ranks disagree: a rank raising alone would leave the
    others waiting inside the ring. One tiny all-gather; every rank of the group must call it.
    """
    from lightning_seqpar.ops._comm import all_gather_rows, collective_device

    code = _BAD if isinstance(local, ValueError) else local
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        mine = torch.tensor([[code]], dtype=torch.int64, device=collective_device(group))
        codes = all_gather_rows(mine, group).flatten().tolist()
    else:
        codes = [code]
    if _BAD in codes:
        if isinstance(local, ValueError):
            raise local
        bad = [r for r, c in enumerate(codes) if c == _BAD]
        raise ValueError(f"the attention mask of sequence-parallel rank(s) {bad} can't run through the ring: {UNSUPPORTED_MASK}")
    kinds = set(codes) - {EITHER}
    if kinds == {FULL, CAUSAL}:
        raise ValueError(
            "the attention mask is causal on some sequence-parallel ranks and not on others; "
            f"build one kind of mask for the whole sequence: {UNSUPPORTED_MASK}"
        )
    # All EITHER: no rank holds more than its first key, so almost nothing can attend; causal
    # is the reading a model that builds dense masks almost always means.
    return kinds != {FULL}


def decode_sdpa_mask(attn_mask: torch.Tensor, batch: int, q_len: int, k_len: int):
    """`attn_mask` of `F.scaled_dot_product_attention` (bool True = attend, or additive),
    broadcastable to `[B, H, Lq, Lk]` -> `(key_padding_mask [B, Lk], kind)`; see
    `decode_row_mask`. Settle the kind over the group with `settle_causal`."""
    what = "the attn_mask given to scaled_dot_product_attention"
    allowed = attn_mask if attn_mask.dtype == torch.bool else allowed_from_additive(attn_mask, what)
    if allowed.dim() > 4:
        raise ValueError(f"{what} has {allowed.dim()} dims; {UNSUPPORTED_MASK}")
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.size(1) > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            raise ValueError(f"{what} differs between heads: {UNSUPPORTED_MASK}")
    return decode_row_mask(allowed[:, 0], batch, q_len, k_len, what)


def decode_mha_masks(
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    group,
):
    """`nn.MultiheadAttention`'s masks (bool True = *ignore*, or additive) -> the ring's
    `(key_padding_mask or None, causal)`. Whether a mask is passed on depends only on which
    arguments were given, never on their values, so every rank of the group agrees."""
    if key_padding_mask is None and (attn_mask is None or is_causal):
        return None, bool(is_causal)
    try:
        real_keys = None if key_padding_mask is None else _mha_key_padding(key_padding_mask, batch, k_len)
        kind = CAUSAL if is_causal else FULL
        # With is_causal=True, nn.MultiheadAttention takes attn_mask as a hint that it is causal.
        if attn_mask is not None and not is_causal:
            row_keys, kind = _mha_attn_mask(attn_mask, batch, heads, q_len, k_len)
            real_keys = row_keys if real_keys is None else real_keys & row_keys
    except ValueError as err:
        settle_causal(err, group)
        raise
    return real_keys, settle_causal(kind, group)


def _mha_key_padding(key_padding_mask: torch.Tensor, batch: int, k_len: int) -> torch.Tensor:
    what = "the key_padding_mask given to nn.MultiheadAttention"
    if key_padding_mask.dtype == torch.bool:
        real_keys = ~key_padding_mask
    else:
        real_keys = allowed_from_additive(key_padding_mask, what)
    real_keys = real_keys.reshape(-1, real_keys.size(-1))
    if real_keys.shape != (batch, k_len):
        raise ValueError(f"{what} must be [B, L_local] = [{batch}, {k_len}], got {tuple(key_padding_mask.shape)}")
    return real_keys


def _mha_attn_mask(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int):
    what = "the attn_mask given to nn.MultiheadAttention"
    allowed = ~attn_mask if attn_mask.dtype == torch.bool else allowed_from_additive(attn_mask, what)
    if allowed.dim() == 3:
        # [B * H, Lq, Lk]: one mask per (sequence, head); the ring needs it equal across heads.
        per_head = allowed.reshape(batch, heads, *allowed.shape[1:])
        if not bool((per_head == per_head[:, :1]).all()):
            raise ValueError(f"{what} differs between heads: {UNSUPPORTED_MASK}")
        allowed = per_head[:, 0]
    elif allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    else:
        raise ValueError(f"{what} must be [L, S] or [B * H, L, S], got {tuple(attn_mask.shape)}")
    return decode_row_mask(allowed, batch, q_len, k_len, what)

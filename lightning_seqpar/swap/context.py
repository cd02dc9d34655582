"""The ring a swapped attention module runs through: which group, which algorithm, which layout.

Swapped modules don't hold the context themselves (a process group can't be pickled or
deep-copied, and a model must stay both). The strategy activates one context for the duration
of a run; a swapped module called while none is active runs its original, single-device
forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lightning_seqpar.ops import ATTENTION_OPS
from lightning_seqpar.ops._pieces import check_layout


@dataclass(frozen=True)
class RingContext:
    """Attention over a sequence cut across the ranks of `group` in `layout`.

    group: the sequence-parallel process group (None = the world). algorithm: a key of
    `ATTENTION_OPS`: "ring" (ring attention, O(L_local) memory), "allgather" (all-gathered K/V,
    for short chunks), "auto" (allgather below a local length, else ring) or "rsa" (the paper's
    Ring Self-Attention). layout: how the global sequence was cut ("contiguous" or "zigzag").
    """

    group: Any
    algorithm: str = "ring"
    layout: str = "zigzag"

    def __post_init__(self) -> None:
        if self.algorithm not in ATTENTION_OPS:
            raise ValueError(f"unknown attention {self.algorithm!r}: use one of {', '.join(map(repr, ATTENTION_OPS))}")
        check_layout(self.layout)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        key_padding_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        """Exact attention of the local queries over the whole sequence.

        q: `[B, Hq, L_local, D]`, k, v: `[B, Hkv, L_local, D]`, key_padding_mask: `[B, L_local]`
        bool, True = a real token. `causal` means causal over *global* positions. Returns
        `[B, Hq, L_local, D]`.
        """
        key_padding_mask = _with_sequence_padding(key_padding_mask, k)
        op = ATTENTION_OPS[self.algorithm]
        return op(
            q, k, v, group=self.group, causal=causal, scale=scale, layout=self.layout,
            key_padding_mask=key_padding_mask, dropout_p=dropout_p,
        )


_active: RingContext | None = None
# Set by the strategy when it padded the current batch to the layout's multiple: `[L_local]`
# bool, True = a real token. Padded keys are masked in every ring attention, whatever mask (or
# none) the model passes, so padding never changes what a real query sees.
_padding: torch.Tensor | None = None


def set_sequence_padding(real_tokens: torch.Tensor | None) -> None:
    """Mask the keys where `real_tokens` (`[L_local]` bool, this rank's chunk) is False in every
    ring attention until it is reset with None."""
    global _padding
    _padding = real_tokens


def _with_sequence_padding(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    if _padding is None:
        return key_padding_mask
    if _padding.numel() != k.size(2):
        raise ValueError(
            f"the batch was padded to {_padding.numel()} local tokens but attention got keys of "
            f"length {k.size(2)}: with pad_to_multiple, attention must run over the batch's sequences"
        )
    real = _padding.to(k.device).expand(k.size(0), -1)
    return real if key_padding_mask is None else key_padding_mask.bool() & real


def active_context() -> RingContext | None:
    """The context of the run in progress, or None outside one."""
    return _active


@contextmanager
def ring_context(context: RingContext):
    """Activate `context` for swapped modules inside the block (not re-entrant)."""
    activate(context)
    try:
        yield context
    finally:
        deactivate()


def activate(context: RingContext) -> None:
    global _active
    _active = context


def deactivate() -> None:
    global _active, _padding
    _active = None
    _padding = None

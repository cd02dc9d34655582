"""The attention algorithm chosen by chunk length: the all-gather op for short chunks, the ring
for long ones.

Below a few thousand tokens per rank the ring's cost is its launches: one fused call and one
exchange per step (and a fold every four), N steps, whatever the chunk length, so it runs at a
fraction of the GPU's speed. The all-gather op makes one collective and one to four fused calls
per rank; its transfers are not hidden behind compute and its gathered K/V are O(L) for the
length of the call, both of which grow with the chunk. The choice depends only on the local
length, which the input check makes equal on every rank, so every rank of a group takes the
same path.

With CUDA graphs on (`set_cuda_graphs`) a replayed ring costs one launch per pass, and it was
ahead of the eager all-gather op at every short length measured (4 H200s over NCCL, forward +
backward at 1-2K tokens per GPU: 0.79-1.85 of one GPU's speed against 0.20-0.66 in the same
jobs; one simulated rank of eight: 0.34-0.77 against 0.08-0.56), so calls the graphs apply to
take the ring at any length. Those timings were of unpadded calls; padded ones replay too and
follow the same rule, untimed.
"""

from __future__ import annotations

import os

import torch

from lightning_seqpar.ops._checks import register_shared_setting
from lightning_seqpar.ops._graphs import graphs_apply
from lightning_seqpar.ops.allgather_attention import allgather_attention
from lightning_seqpar.ops.ring_attention import ring_attention

# Local lengths below this go through the all-gather op (BENCHMARKS.md, sections 1 and 7). One
# simulated rank of eight on an H200, forward+backward: at 1K tokens per rank the all-gather op
# is 1.4-3.1x faster than the ring, at 2K 0.94-1.8x, from 4K the ring is faster (1.02-1.5x).
# Two H200s over NCCL: the all-gather op is 1.15-1.4x faster below 8K without a causal mask,
# and 1.2-1.4x slower with one.
DEFAULT_ALLGATHER_BELOW = 2048

ENV = "LIGHTNING_SEQPAR_ALLGATHER_BELOW"


def _checked(tokens, source: str) -> int:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"{source} takes a number of tokens per rank >= 0, got {tokens!r}")
    return tokens


def _from_environment() -> int:
    text = os.environ.get(ENV)
    if text is None:
        return DEFAULT_ALLGATHER_BELOW
    return _checked(int(text) if text.strip().isdigit() else text, ENV)


_allgather_below = _from_environment()


def set_allgather_below(tokens: int) -> None:
    """Local lengths (tokens per rank) below `tokens` take the all-gather op under "auto";
    0 = always the ring. The environment variable LIGHTNING_SEQPAR_ALLGATHER_BELOW sets the
    starting value."""
    global _allgather_below
    _allgather_below = _checked(tokens, "set_allgather_below")


def allgather_below() -> int:
    return _allgather_below


# Ranks that disagree on the threshold would take different ops for the same chunk length.
register_shared_setting("set_allgather_below", allgather_below)


def auto_attention(
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
    """`allgather_attention` when the local length is below `allgather_below()` and the ring
    would not replay from CUDA graphs, else `ring_attention`; same contract as both."""
    short = q.dim() >= 3 and q.size(2) < _allgather_below
    op = allgather_attention if short and not graphs_apply(q, group) else ring_attention
    return op(
        q, k, v, group=group, causal=causal, scale=scale, layout=layout,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p,
    )

"""Module swap: make a model's attention run through the ring, keeping its parameters.

Out of the box: `torch.nn.MultiheadAttention`, and any module whose forward calls
`torch.nn.functional.scaled_dot_product_attention`. `register_attention` plugs in others.
"""

from lightning_seqpar.swap.apply import SwapReport, restore_attention, swap_attention
from lightning_seqpar.swap.context import RingContext, active_context, ring_context
from lightning_seqpar.swap.registry import register_attention, unregister_attention

__all__ = [
    "RingContext",
    "SwapReport",
    "active_context",
    "register_attention",
    "restore_attention",
    "ring_context",
    "swap_attention",
    "unregister_attention",
]

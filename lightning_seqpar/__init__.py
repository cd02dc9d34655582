"""lightning_seqpar: sequence parallelism (Ring Self-Attention, ring attention) for PyTorch Lightning."""

from lightning_seqpar.ops import ring_attention, ring_self_attention

__version__ = "0.1.0"

__all__ = ["ring_attention", "ring_self_attention"]

"""Reference models for the examples: plain PyTorch, no sequence-parallel code inside."""

from lightning_seqpar.models.gpt import GPT, GPTConfig
from lightning_seqpar.models.lm_module import CausalLMModule

__all__ = ["GPT", "GPTConfig", "CausalLMModule"]

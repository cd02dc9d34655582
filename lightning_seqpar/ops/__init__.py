"""Sequence-parallel attention ops: pure torch and torch.distributed, no Lightning.

Every op takes the local shards in SDPA layout, `q: [B, Hq, L_local, D]`,
`k, v: [B, Hkv, L_local, D]`, and returns the local output `[B, Hq, L_local, D]`.
"""

from lightning_seqpar.ops._checks import set_input_checks
from lightning_seqpar.ops._graphs import captured_signatures, clear_cuda_graphs, set_cuda_graphs
from lightning_seqpar.ops._kernels import KERNELS, set_block_kernel
from lightning_seqpar.ops.allgather_attention import allgather_attention
from lightning_seqpar.ops.auto_attention import auto_attention, set_allgather_below
from lightning_seqpar.ops.ring_attention import backward_blocks_per_call, ring_attention, set_backward_blocks_per_call
from lightning_seqpar.ops.ring_self_attention import ring_self_attention

ATTENTION_OPS = {
    "ring": ring_attention,
    "rsa": ring_self_attention,
    "allgather": allgather_attention,
    "auto": auto_attention,
}

__all__ = [
    "ATTENTION_OPS",
    "KERNELS",
    "allgather_attention",
    "auto_attention",
    "backward_blocks_per_call",
    "captured_signatures",
    "clear_cuda_graphs",
    "ring_attention",
    "ring_self_attention",
    "set_allgather_below",
    "set_backward_blocks_per_call",
    "set_block_kernel",
    "set_cuda_graphs",
    "set_input_checks",
]

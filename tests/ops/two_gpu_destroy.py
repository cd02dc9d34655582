"""Run by `test_cuda_graphs.test_destroying_the_group_after_replays_returns` under torchrun on two
GPUs: replay the ring over NCCL, then destroy the process group with its graphs still held."""

import os

import torch
import torch.distributed as dist

from lightning_seqpar.ops import captured_signatures, ring_attention, set_cuda_graphs

rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
set_cuda_graphs(True)
q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
for _ in range(3):  # eager, captured, replayed
    ring_attention(q, k, v, causal=True, layout="zigzag").sum().backward()
torch.cuda.synchronize()
held = captured_signatures()
dist.destroy_process_group()
print(f"rank {rank} destroyed with {held} graphs held", flush=True)

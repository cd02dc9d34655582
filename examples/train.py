"""Placeholder main job until the Lightning strategy lands: runs ring attention on 2 gloo
processes over a 4096-token sequence and checks it against one process holding the whole
sequence. Replaced by Hydra-configured training once `strategy="seqpar"` exists."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_seqpar.layout import shard_sequence, unshard_sequence
from lightning_seqpar.ops import ring_attention

SEQ_LEN, WORLD = 4096, 2


def inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 8, SEQ_LEN, 64, generator=gen) for _ in range(3)]


def worker(rank, results):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    local = [shard_sequence(t, 2, rank, WORLD, "zigzag") for t in inputs()]
    results[rank] = ring_attention(*local, causal=True, layout="zigzag")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(results,), nprocs=WORLD)
        out = unshard_sequence([results[r] for r in range(WORLD)], 2, "zigzag")
    ref = F.scaled_dot_product_attention(*inputs(), is_causal=True)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"ring attention over {WORLD} processes, {SEQ_LEN} tokens, causal zigzag: relative error {err:.2e}")

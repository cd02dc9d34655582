"""Causal load balance: slowest rank's work / mean rank's work at N ranks, contiguous cut
against zigzag. Each rank of the ring is simulated in turn on one device and timed (forward +
backward), beside the count of attention cells each rank computes.

    python benchmarks/balance.py                   # CUDA: N = 8, 8K tokens per rank
    python benchmarks/balance.py --device cpu --tokens 256 --world-size 4

Prints a table and writes benchmarks/results/balance_<device>.json.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import attention_parser, card, parse_attention_args, time_ms, write_result  # noqa: E402
from benchmarks.simulated_ring import every_rank_holds_mine, fake_group  # noqa: E402
from lightning_seqpar.ops import ring_attention  # noqa: E402
from lightning_seqpar.ops._pieces import causal_step_tasks  # noqa: E402


def cells(rank, world_size, tokens, layout):
    """Query x key cells one rank computes under a causal mask (a causal block counts half)."""
    return sum(
        (t.q.stop - t.q.start) * (t.k.stop - t.k.start) / (2 if t.causal else 1)
        for owner in range(world_size)
        for t in causal_step_tasks(rank, owner, world_size, tokens, layout, causal=True)
    )


def main():
    parser = attention_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=128)
    a = parse_attention_args(parser)
    dtype, n = getattr(torch, a.dtype), a.world_size
    print(f"# {card(a.device)} | torch {torch.__version__} | {a.dtype} | {a.heads} x {a.head_dim} | N = {n} | "
          f"{a.tokens} tokens per rank | causal, forward + backward")
    q, k, v = (torch.randn(1, a.heads, a.tokens, a.head_dim, device=a.device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    rows, summary = [], {}
    for layout in ("contiguous", "zigzag"):
        times = []
        for rank in range(n):
            with fake_group(rank, n), every_rank_holds_mine():
                ms = time_ms(lambda: torch.autograd.grad(ring_attention(q, k, v, causal=True, layout=layout), (q, k, v), grad), a.device, a.reps)
            times.append(ms)
            rows.append({"layout": layout, "rank": rank, "ms": ms, "cells": cells(rank, n, a.tokens, layout)})
        work = [cells(r, n, a.tokens, layout) for r in range(n)]
        summary[layout] = {
            "slowest_over_mean_time": max(times) / statistics.mean(times),
            "slowest_over_mean_cells": max(work) / statistics.mean(work),
        }
        print(f"{layout:>10}: per-rank ms " + " ".join(f"{t:7.2f}" for t in times))
        print(f"{'':>10}  slowest/mean time {summary[layout]['slowest_over_mean_time']:.3f}, "
              f"cells {summary[layout]['slowest_over_mean_cells']:.3f}")
    write_result("balance", a.device, {k: v for k, v in vars(a).items() if k != "out"}, rows, a.out, summary=summary)


if __name__ == "__main__":
    main()

"""Would fewer, longer block calls raise the ceiling that the block kernel sets on the ring?
(diagnostic)

One rank's block-kernel calls alone, as `attention.py`'s "calls alone" column times them, and
the same calls with the key rows of up to G consecutive ring steps of the same shape given to
one call (what a walk that lands G blocks side by side could do). Prints efficiency = SDPA on
the whole sequence / (N x the calls' time), forward and forward+backward, for each G.

    python benchmarks/diagnostics/grouped_calls.py --tokens 4096 8192 --groups 1 2 4
"""
import argparse
import itertools
import sys

sys.path.insert(0, ".")
import torch

from benchmarks.common import time_block_calls, whole_sequence_sdpa_ms
from lightning_seqpar.ops._kernels import select_block_kernel
from lightning_seqpar.ops._pieces import causal_step_tasks

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
parser.add_argument("--ranks", type=int, nargs="+", default=[0, 4], help="simulated ranks (zigzag shapes differ)")
parser.add_argument("--world-size", type=int, default=8)
parser.add_argument("--heads", type=int, default=32)
parser.add_argument("--reps", type=int, default=10)
a = parser.parse_args()
n, dtype = a.world_size, torch.bfloat16


def grouped(tasks_by_step, g):
    """[(q rows, [k rows of each step], causal)]: consecutive steps whose single task has the
    same q rows and k length share one call, up to g steps."""
    calls = []
    for step, tasks in enumerate(tasks_by_step):
        for t in tasks:
            last = calls[-1] if calls else None
            if (len(tasks) == 1 and not t.causal and last is not None and not last[2] and last[0] == t.q
                    and len(last[1]) < g and last[3] == step - 1 and last[1][0].stop - last[1][0].start == t.k.stop - t.k.start):
                last[1].append(t.k)
                calls[-1] = (last[0], last[1], False, step)
            else:
                calls.append((t.q, [t.k], t.causal, step if len(tasks) == 1 else -10))
    return [(q, ks, c) for q, ks, c, _ in calls]


print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 | {a.heads} heads | N = {n}")
print(f"{'D':>4} {'mask':>7} {'tok':>6} {'rank':>4} {'G':>2} {'calls':>5} | {'fwd ms':>7} {'eff':>5} | {'f+b ms':>7} {'eff':>5}")
for dim, causal, tokens in itertools.product(a.head_dims, [False, True], a.tokens):
    sdpa_f, sdpa_fb = whole_sequence_sdpa_ms(a.heads, n * tokens, dim, causal, dtype, "cuda", a.reps)
    q, k, v = (torch.randn(1, a.heads, tokens, dim, device="cuda", dtype=dtype) for _ in range(3))
    kernel = select_block_kernel(q, has_bias=False)
    scale = dim ** -0.5
    for rank in (a.ranks if causal else a.ranks[:1]):
        by_step = [causal_step_tasks(rank, (rank - s) % n, n, tokens, "zigzag", causal) for s in range(n)]
        for g in a.groups:
            calls = []
            for qr, krs, c in grouped(by_step, g):
                ks = torch.cat([k[:, :, r] for r in krs], dim=2)
                vs = torch.cat([v[:, :, r] for r in krs], dim=2)
                calls.append((q[:, :, qr].contiguous(), ks, vs, c))
            f, fb = time_block_calls(kernel, calls, scale, "cuda", a.reps)
            print(f"{dim:>4} {'causal' if causal else 'full':>7} {tokens:>6} {rank:>4} {g:>2} {len(calls):>5} | "
                  f"{f:7.3f} {sdpa_f / (n * f):5.3f} | {fb:7.3f} {sdpa_fb / (n * fb):5.3f}", flush=True)

"""Host time against device time of one simulated ring rank, reps queued back to back, and
where the host time goes (cProfile, sorted by own time).

When the host needs as long to post a rep as the device needs to run it, the device waits on
the host between kernels and the ring's timings move with the lent host's CPU.

With `--calls`, first the host cost of each piece a ring step posts (block kernel calls, a fold
launch, a simulated transfer, small allocations), on shapes too small for the device to be the
bottleneck.

    python benchmarks/diagnostics/ring_host_time.py --causal --head-dim 64
    python benchmarks/diagnostics/ring_host_time.py --causal --head-dim 128 --backward --calls
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import apply_ring_args, one_shape_parser  # noqa: E402
from benchmarks.simulated_ring import _simulated_transfer, every_rank_holds_mine, fake_group  # noqa: E402
from lightning_seqpar.ops import ring_attention  # noqa: E402
from lightning_seqpar.ops._kernels import KERNELS  # noqa: E402
from lightning_seqpar.ops._merge import KERNEL_SLOTS, _triton_fold  # noqa: E402


def host_us(fn, reps: int = 200) -> float:
    """Host time per call of `fn` in microseconds, calls queued back to back."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - began
    torch.cuda.synchronize()
    return elapsed / reps * 1e6


def print_call_costs(heads: int, head_dim: int) -> None:
    """What posting each piece of a ring step costs the host: 256 rows, so the device is idle."""
    q = torch.randn(1, heads, 256, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v, dout = torch.randn_like(q), torch.randn_like(q), torch.randn_like(q)
    cudnn, flash = KERNELS["cudnn"], KERNELS["flash"]
    out, lse = cudnn.forward(q, k, v, scale=0.1, causal=False, bias=None)
    running = (torch.zeros(1, 256, heads, head_dim, device="cuda").transpose(1, 2), torch.zeros(1, heads, 256, device="cuda"))
    kv = torch.stack([k, v])
    fold = _triton_fold()
    calls = {
        "cuDNN forward call": lambda: cudnn.forward(q, k, v, scale=0.1, causal=True, bias=None),
        "cuDNN backward call": lambda: cudnn.backward(dout, q, k, v, out, lse, scale=0.1, causal=True, bias=None),
        "flash forward call": lambda: flash.forward(q, k, v, scale=0.1, causal=True, bias=None),
        "aten cuDNN forward, no wrapper": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=0.1),
        "fold of 1 block": lambda: fold([(slice(0, 256), out, lse)], running, *running),
        f"fold of {KERNEL_SLOTS} blocks": lambda: fold([(slice(0, 256), out, lse)] * KERNEL_SLOTS, running, *running),
        "simulated K/V transfer": lambda: _simulated_transfer(kv),
        "torch.empty of a K/V block": lambda: torch.empty(kv.shape, device="cuda", dtype=kv.dtype),
        "narrow + contiguous": lambda: k.narrow(2, 0, 128).contiguous(),
        "in-place add": lambda: running[1].add_(running[1]),
    }
    for name, fn in calls.items():
        print(f"{name:<32} {host_us(fn):8.1f} us of host time per call")


def main():
    parser = one_shape_parser(__doc__, tokens=4096, head_dim=64)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--lines", type=int, default=30, help="cProfile lines to print")
    parser.add_argument("--calls", action="store_true", help="first, the host cost of each piece of a ring step")
    a = parser.parse_args()
    apply_ring_args(a)
    if not torch.cuda.is_available():
        raise SystemExit("host against device time needs a CUDA device")
    if a.calls:
        with fake_group(0, a.world_size), every_rank_holds_mine():
            print_call_costs(a.heads, a.head_dim)
    qkv = [torch.randn(1, a.heads, a.tokens, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3)]
    grad = torch.randn_like(qkv[0])

    def rep():
        out = ring_attention(*qkv, causal=a.causal, layout="zigzag")
        if a.backward:
            torch.autograd.grad(out, qkv, grad)

    with fake_group(0, a.world_size), every_rank_holds_mine():
        for _ in range(5):
            rep()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record()
        for _ in range(a.reps):
            rep()
        host_ms = (time.perf_counter() - began) / a.reps * 1e3
        stop.record()
        torch.cuda.synchronize()
        print(f"{a.tokens} tokens per rank, D = {a.head_dim}, {'causal' if a.causal else 'non-causal'}, "
              f"{'forward + backward' if a.backward else 'forward'}, transfer {a.transfer}: host {host_ms:.3f} ms "
              f"per rep, device {start.elapsed_time(stop) / a.reps:.3f} ms per rep (back to back)")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(a.reps):
            rep()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(a.lines)
        print(text.getvalue())


if __name__ == "__main__":
    main()

"""Host time against device time of one simulated ring rank, reps queued back to back, and
where the host time goes (cProfile, sorted by own time).

When the host needs as long to post a rep as the device needs to run it, the device waits on
the host between kernels and the ring's timings move with the lent host's CPU.

    python benchmarks/diagnostics/ring_host_time.py --causal --head-dim 64
    python benchmarks/diagnostics/ring_host_time.py --causal --head-dim 128 --backward
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

from benchmarks.common import one_shape_parser  # noqa: E402
from benchmarks.simulated_ring import every_rank_holds_mine, fake_group, set_transfer  # noqa: E402
from lightning_seqpar.ops import ring_attention  # noqa: E402


def main():
    parser = one_shape_parser(__doc__, tokens=4096, head_dim=64)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--lines", type=int, default=30, help="cProfile lines to print")
    a = parser.parse_args()
    set_transfer(a.transfer, a.comm_priority)
    if not torch.cuda.is_available():
        raise SystemExit("host against device time needs a CUDA device")
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

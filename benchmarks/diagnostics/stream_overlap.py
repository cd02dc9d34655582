"""Do the ring's memory-bound passes run beside a cuDNN attention call when put on a side stream?
(diagnostic) One block's backward beside the previous block's dK/dV float32 adds, and one
forward beside a fold of four blocks: time in series on one stream against the two streams."""
import sys

sys.path.insert(0, ".")
import torch  # noqa: E402

from benchmarks.common import time_ms  # noqa: E402
from lightning_seqpar.ops import _merge  # noqa: E402
from lightning_seqpar.ops._kernels import KERNELS  # noqa: E402

ker = KERNELS["cudnn"]
fold = _merge._triton_fold()
side = torch.cuda.Stream()


def timed(fn):
    """Microseconds."""
    return time_ms(fn, "cuda", 20, warmup=3) * 1e3


def compare(name, call, extra_name, extra):
    """`call` alone, `extra` alone, both in series on one stream, and `extra` on a side stream
    beside `call` (as the previous step's pass would run beside this step's call)."""

    def beside():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            extra()
        call()
        torch.cuda.current_stream().wait_stream(side)

    alone, extra_alone = timed(call), timed(extra)
    serial, overlapped = timed(lambda: (call(), extra())), timed(beside)
    print(f"{name} {alone:.0f} us, {extra_name} {extra_alone:.0f} us, serial {serial:.0f}, side stream {overlapped:.0f} "
          f"(saved {serial - overlapped:.0f} of {extra_alone:.0f})")


for L in (4096, 8192):
    H, D = 32, 128
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o, l = ker.forward(q, k, v, scale=0.088, causal=False, bias=None)
    do = torch.randn_like(o)
    dkv = torch.zeros(2, 1, H, L, D, device="cuda")
    dk_b, dv_b = torch.randn_like(k), torch.randn_like(v)
    run = torch.zeros(1, L, H, D, device="cuda").transpose(1, 2), torch.zeros(1, H, L, device="cuda")
    parts = [(slice(0, L), o, l)] * 4
    compare(f"L={L}: bwd", lambda: ker.backward(do, q, k, v, o, l, scale=0.088, causal=False, bias=None),
            "dK+dV adds", lambda: (dkv[0].add_(dk_b), dkv[1].add_(dv_b)))
    compare(f"L={L}: fwd", lambda: ker.forward(q, k, v, scale=0.088, causal=False, bias=None),
            "fold of 4", lambda: fold(parts, run, *run))

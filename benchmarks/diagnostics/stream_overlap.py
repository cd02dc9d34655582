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


for L in (4096, 8192):
    H, D = 32, 128
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o, l = ker.forward(q, k, v, scale=0.088, causal=False, bias=None)
    do = torch.randn_like(o)
    dkv = torch.zeros(2, 1, H, L, D, device="cuda")
    dk_b, dv_b = torch.randn_like(k), torch.randn_like(v)
    bwd = lambda: ker.backward(do, q, k, v, o, l, scale=0.088, causal=False, bias=None)
    fwd = lambda: ker.forward(q, k, v, scale=0.088, causal=False, bias=None)
    def adds():
        dkv[0].add_(dk_b); dkv[1].add_(dv_b)
    run = torch.zeros(1, L, H, D, device="cuda").transpose(1, 2), torch.zeros(1, H, L, device="cuda")
    parts = [(slice(0, L), o, l)] * 4
    def folds():
        fold(parts, run, *run)
    t_b, t_a = timed(bwd), timed(adds)
    t_serial = timed(lambda: (bwd(), adds()))
    # main: backward; side: the previous step's adds, which may run beside it.
    def concurrent():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            adds()
        bwd()
        torch.cuda.current_stream().wait_stream(side)
    t_conc = timed(concurrent)
    t_f, t_fold = timed(fwd), timed(folds)
    t_fs = timed(lambda: (fwd(), folds()))
    def conc_f():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            folds()
        fwd()
        torch.cuda.current_stream().wait_stream(side)
    t_fc = timed(conc_f)
    print(f"L={L}: bwd {t_b:.0f} us, dK+dV adds {t_a:.0f} us, serial {t_serial:.0f}, side stream {t_conc:.0f} (saved {t_serial - t_conc:.0f} of {t_a:.0f})")
    print(f"L={L}: fwd {t_f:.0f} us, fold of 4 {t_fold:.0f} us, serial {t_fs:.0f}, side stream {t_fc:.0f} (saved {t_fs - t_fc:.0f} of {t_fold:.0f})")

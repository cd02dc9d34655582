"""Do the fused kernels take grouped K/V heads natively (no expand/reduce copies)? (diagnostic)"""
import sys
sys.path.insert(0, ".")
import torch
from benchmarks.common import time_ms
from lightning_seqpar.ops._kernels import KERNELS
from lightning_seqpar.ops._common import expand_heads, reduce_heads
dev = "cuda" if torch.cuda.is_available() else "cpu"
def gpu_ms(fn, reps=20):
    return time_ms(fn, "cuda", reps, warmup=3) if dev == "cuda" else float("nan")
names = ("cudnn", "flash", "efficient") if dev == "cuda" else ("cpu_flash",)
L = 4096 if dev == "cuda" else 128
dt = torch.bfloat16 if dev == "cuda" else torch.float32
for name in names:
    ker = KERNELS[name]
    for causal in (False, True):
        q = torch.randn(1, 32, L, 128, device=dev, dtype=dt)
        k, v = torch.randn(1, 8, L, 128, device=dev, dtype=dt), torch.randn(1, 8, L, 128, device=dev, dtype=dt)
        ke, ve = expand_heads(k, 4), expand_heads(v, 4)
        o2, l2 = ker.forward(q, ke, ve, scale=0.088, causal=causal, bias=None)
        do = torch.randn_like(q)
        try:
            o1, l1 = ker.forward(q, k, v, scale=0.088, causal=causal, bias=None)
            g1 = ker.backward(do, q, k, v, o2, l2, scale=0.088, causal=causal, bias=None)
        except Exception as e:
            print(name, causal, "native GQA fails:", type(e).__name__, str(e).splitlines()[0][:200]); continue
        g2 = ker.backward(do, q, ke, ve, o2, l2, scale=0.088, causal=causal, bias=None)
        g2 = (g2[0], reduce_heads(g2[1], 4), reduce_heads(g2[2], 4))
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"{name} causal={causal} native GQA: out {rel(o1, o2):.1e} lse {rel(l1, l2):.1e} dq {rel(g1[0], g2[0]):.1e} "
              f"dk {rel(g1[1], g2[1]):.1e} {tuple(g1[1].shape)} dv {rel(g1[2], g2[2]):.1e}")
        print(f"   fwd ms native {gpu_ms(lambda: ker.forward(q, k, v, scale=0.088, causal=causal, bias=None)):.3f} "
              f"expanded(incl copies) {gpu_ms(lambda: ker.forward(q, expand_heads(k, 4), expand_heads(v, 4), scale=0.088, causal=causal, bias=None)):.3f}")

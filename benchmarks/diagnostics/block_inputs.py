"""Do the cuDNN/flash block calls take row-sliced (strided) K/V, and what do the ring's extra passes cost? (diagnostic)"""
import sys
sys.path.insert(0, ".")
import torch
from benchmarks.common import time_ms
from lightning_seqpar.ops._kernels import KERNELS, accumulator_like
from lightning_seqpar.ops._merge import _triton_fold

def gpu_ms(fn, reps=30):
    return time_ms(fn, "cuda", reps, warmup=3)

for L in (4096, 8192):
    half = L // 2
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
    ks, vs = kv[0].narrow(2, 0, half), kv[1].narrow(2, 0, half)
    kc, vc = ks.contiguous(), vs.contiguous()
    for name in ("cudnn", "flash"):
        ker = KERNELS[name]
        try:
            o1, l1 = ker.forward(q, ks, vs, scale=0.088, causal=False, bias=None)
        except Exception as e:
            print(name, L, "strided forward fails:", type(e).__name__, str(e)[:200]); continue
        o2, l2 = ker.forward(q, kc, vc, scale=0.088, causal=False, bias=None)
        do = torch.randn_like(o2)
        try:
            g1 = ker.backward(do, q, ks, vs, o2, l2, scale=0.088, causal=False, bias=None)
            g2 = ker.backward(do, q, kc, vc, o2, l2, scale=0.088, causal=False, bias=None)
            gd = max((a.float() - b.float()).abs().max().item() for a, b in zip(g1, g2))
        except Exception as e:
            gd = f"bwd fails {type(e).__name__} {str(e)[:200]}"
        print(f"{name} L={L} strided vs contiguous: out diff {(o1.float()-o2.float()).abs().max().item():.2e} lse diff {(l1-l2).abs().max().item():.2e} grad diff {gd}")
        print(f"  fwd ms strided {gpu_ms(lambda: ker.forward(q, ks, vs, scale=0.088, causal=False, bias=None)):.3f} "
              f"contig {gpu_ms(lambda: ker.forward(q, kc, vc, scale=0.088, causal=False, bias=None)):.3f} "
              f"copy+contig {gpu_ms(lambda: ker.forward(q, ks.contiguous(), vs.contiguous(), scale=0.088, causal=False, bias=None)):.3f}")
        print(f"  bwd ms strided {gpu_ms(lambda: ker.backward(do, q, ks, vs, o2, l2, scale=0.088, causal=False, bias=None)):.3f} "
              f"contig {gpu_ms(lambda: ker.backward(do, q, kc, vc, o2, l2, scale=0.088, causal=False, bias=None)):.3f}")
    ker = KERNELS["cudnn"]
    o, l = ker.forward(q, kc, vc, scale=0.088, causal=False, bias=None)
    acc = accumulator_like(q, torch.float32, ker); acc.copy_(o); lse = l.clone()
    g = torch.randn(1, L, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    print(f"L={L} merge {gpu_ms(lambda: _triton_fold()([(slice(0, L), o, l)], (acc, lse), acc, lse))*1e3:.0f} us, fp32 add_ of a bf16 block {gpu_ms(lambda: acc.add_(g))*1e3:.0f} us, "
          f"kv clone {gpu_ms(lambda: kv.clone())*1e3:.0f} us, fp32 dkv clone {gpu_ms(lambda: kv.float().clone())*1e3:.0f} us (incl cast), "
          f"attn fwd q{L}xk{half} {gpu_ms(lambda: ker.forward(q, kc, vc, scale=0.088, causal=False, bias=None))*1e3:.0f} us")

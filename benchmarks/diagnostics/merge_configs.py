"""Merge kernel: time per (BLOCK_M, num_warps) against a same-bytes copy (diagnostic)."""
import sys
sys.path.insert(0, ".")
import torch, triton
from benchmarks.common import time_ms
from lightning_seqpar.ops import _merge
def ms(fn, reps=50):
    """Microseconds."""
    return time_ms(fn, "cuda", reps, warmup=5) * 1e3
# fetch the jitted kernel from the launcher's closure
launch = _merge._triton_merge()
kernel = [c.cell_contents for c in launch.__closure__ if hasattr(c.cell_contents, "run")][0]
for D in (64, 128):
    for L in (4096, 8192):
        B, H = 1, 32
        out = torch.randn(B, L, H, D, device="cuda").transpose(1, 2)
        lse = torch.randn(B, H, L, device="cuda")
        bo = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        bl = torch.randn(B, H, L, device="cuda")
        ref_o, ref_l = out.clone(), lse.clone(); _merge.merge_block_eager_(ref_o, ref_l, bo, bl)
        nbytes = out.numel() * (4 + 4 + 2)
        src = torch.empty(nbytes // 8, device="cuda", dtype=torch.float32); dst = torch.empty_like(src)
        copy_us = ms(lambda: dst.copy_(src))
        res = []
        for bm in (16, 32, 64, 128):
            for w in (2, 4, 8):
                def run():
                    grid = (triton.cdiv(L, bm), B * H)
                    kernel[grid](out, lse, bo, bl, H, L, D, *out.stride()[:3], *lse.stride(), *bo.stride()[:3], *bl.stride(),
                                 BLOCK_M=bm, BLOCK_D=triton.next_power_of_2(D), num_warps=w)
                o0, l0 = out.clone(), lse.clone(); run()
                ok = torch.allclose(out, ref_o, atol=1e-5) and torch.allclose(lse, ref_l, atol=1e-5)
                out.copy_(o0); lse.copy_(l0)
                t = ms(run); out.copy_(o0); lse.copy_(l0)
                res.append((t, bm, w, ok))
        res.sort()
        cur = [r for r in res if r[1] == max(1, min(128, 8192 // triton.next_power_of_2(D))) and r[2] == 4][0]
        print(f"D={D} L={L}: same-bytes copy {copy_us:.0f} us; current (BM={cur[1]}, w=4) {cur[0]:.0f} us; best {res[:4]}")

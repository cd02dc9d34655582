"""Fold kernel: time per (rows per program, warps) against a copy of the same bytes
(diagnostic). The folds of a non-causal ring of 8: four bf16 blocks into the float32 running
output, then four more and the running output into the bf16 output."""
import sys

sys.path.insert(0, ".")
import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.common import time_ms  # noqa: E402
from lightning_seqpar.ops import _merge  # noqa: E402

fold = _merge._triton_fold()


def us(fn, reps=50):
    return time_ms(fn, "cuda", reps, warmup=5) * 1e3


def blhd(length, heads, dim, dtype):
    """[B, H, L, D] stored as [B, L, H, D], as the block kernels return their outputs."""
    return torch.randn(1, length, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)


for dim in (64, 128):
    for length in (4096, 8192):
        heads, rows = 32, slice(0, length)
        parts = [(rows, blhd(length, heads, dim, torch.bfloat16), torch.randn(1, heads, length, device="cuda")) for _ in range(4)]
        running = blhd(length, heads, dim, torch.float32), torch.empty(1, heads, length, device="cuda")
        final = blhd(length, heads, dim, torch.bfloat16), torch.empty(1, heads, length, device="cuda")
        want_running = torch.empty_like(running[0]), torch.empty_like(running[1])
        _merge.fold_reference(parts, None, *want_running)
        want_final = torch.empty_like(final[0]), torch.empty_like(final[1])
        _merge.fold_reference(parts, want_running, *want_final)
        # Bytes per element of the output: 4 bf16 reads + one fp32 write, then 4 bf16 + one fp32
        # read + one bf16 write: 26. A copy reads and writes its bytes, so it copies 13.
        element_count = running[0].numel()
        src = torch.empty(element_count * 13 // 4, device="cuda")
        dst = torch.empty_like(src)
        copy_us = us(lambda: dst.copy_(src))
        results = []
        for block_m in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                tiles = (block_m, warps)

                def both(tiles=tiles):
                    fold(parts, None, *running, tiles=tiles)
                    fold(parts, running, *final, tiles=tiles)

                both()
                ok = (torch.allclose(running[0], want_running[0], atol=1e-5) and torch.allclose(running[1], want_running[1], atol=1e-5)
                      and torch.allclose(final[0].float(), want_final[0].float(), atol=1e-2))
                results.append((round(us(both), 1), block_m, warps, ok))
        results.sort()
        chosen = [r for r in results if (r[1], r[2]) == (32, max(2, min(8, triton.next_power_of_2(dim) // 32)))][0]
        print(f"D={dim} L={length}: same-bytes copy {copy_us:.0f} us; both folds as chosen {chosen[1:3]} {chosen[0]:.0f} us; "
              f"best (us, rows, warps, equal to fold_reference) {results[:4]}")

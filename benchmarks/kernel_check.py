"""Every block kernel on this machine, forced in turn, against SDPA on the global sequence:
one simulated rank of an 8-rank ring, causal zigzag and non-causal, with and without a key
padding mask. On CUDA with Triton, also the fold kernel (`lightning_seqpar/ops/_merge.py`)
against `fold_reference`, its arithmetic in torch ops. Prints one line per case and exits
non-zero if any error exceeds its tolerance.

    python benchmarks/kernel_check.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulated_ring import check_rank  # noqa: E402
from lightning_seqpar.ops import _merge, set_block_kernel  # noqa: E402

# Relative error allowed per dtype: bf16 keeps 8 bits of mantissa (one rounding of the output
# alone is ~4e-3), fp16 11 bits.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def cases(device):
    if device == "cuda":
        yield from [("cudnn", torch.bfloat16), ("flash", torch.bfloat16), ("flash", torch.float16),
                    ("efficient", torch.bfloat16), ("efficient", torch.float32), ("math", torch.float32), (None, torch.bfloat16)]
    else:
        yield from [("cpu_flash", torch.float32), ("cpu_flash", torch.bfloat16), ("math", torch.float64), (None, torch.float32)]


def _fold_case(heads_first: bool, dtype, dim: int, local_len: int, row_ranges, running: bool, weighted: bool, seed: int):
    """Max relative error of one fold kernel launch against `fold_reference`, on block results
    laid out as the fused kernels return them ([B, L, H, D] storage, or [B, H, L, D] when q was
    stored so), lse rows padded to 32 as the efficient kernel pads them, one row seeing no key."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch, heads = 2, 3

    def rows_tensor(rows, length, dtype_):
        shape = (batch, heads, length, dim) if heads_first else (batch, length, heads, dim)
        x = torch.randn(shape, generator=gen, device="cuda").to(dtype_)
        return x if heads_first else x.transpose(1, 2)

    def lse_tensor(length):
        padded = torch.randn(batch, heads, -(-length // 32) * 32, generator=gen, device="cuda") * 4
        return padded[..., :length]

    parts = []
    for i, rows in enumerate(row_ranges):
        out, lse = rows_tensor(rows, rows.stop - rows.start, dtype), lse_tensor(rows.stop - rows.start)
        if i == 1:
            lse[:, :, 0], out[:, :, 0] = _merge.EMPTY_LSE, 0.0
        parts.append((rows, *_merge._kernel_ready(out, lse if weighted else None)))
    run = (rows_tensor(slice(0, local_len), local_len, torch.float32), lse_tensor(local_len).contiguous() if weighted else None) if running else None
    dest_dtype = torch.float32 if running else dtype
    got = (rows_tensor(slice(0, local_len), local_len, dest_dtype), torch.empty(batch, heads, local_len, device="cuda") if weighted else None)
    want = (torch.empty_like(got[0]), torch.empty_like(got[1]) if weighted else None)
    _merge._triton_fold()(parts, run, *got)
    _merge.fold_reference(parts, run, *want)
    errors = [(got[0].float() - want[0].float()).abs().max() / want[0].float().abs().max()]
    if weighted:
        errors.append((got[1] - want[1]).abs().max() / want[1].abs().max())
    return max(e.item() for e in errors), dest_dtype


def check_fold_kernel() -> int:
    failures = 0
    # Head dims: 8 (tiles of many rows), 80 (columns masked up to 128), 128 (the models' own).
    for heads_first, dtype, dim, local_len, running, weighted in itertools.product(
            [False, True], [torch.bfloat16, torch.float16, torch.float32], [8, 80, 128], [24, 256],
            [False, True], [True, False]):
        whole, first, second = slice(0, local_len), slice(0, local_len // 2), slice(local_len // 2, local_len)
        # "ring of 8" fills every argument slot of the kernel (an output's fold of a ring of 8).
        ring = [whole, second, first, whole, second, first, whole, second]
        for name, row_ranges in [("ring", ring[:4]), ("ring of 8", ring), ("halves", [first, second, second]), ("one", [second])]:
            worst, dest_dtype = _fold_case(heads_first, dtype, dim, local_len, row_ranges, running, weighted, seed=local_len + dim)
            ok = worst <= TOLERANCE[dest_dtype]
            failures += not ok
            print(f"      fold {str(dtype):>15} {'[B,H,L,D]' if heads_first else '[B,L,H,D]'} D={dim:3} L={local_len:3} "
                  f"{name:9} running={running!s:5} {'merge' if weighted else 'sum  '}  max rel err {worst:.1e}  {'ok' if ok else 'FAIL'}")
    return failures


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = check_fold_kernel() if device == "cuda" and _merge._triton_fold() is not None else 0
    # Short chunks (zigzag halves of 12 rows, head dim 8) beside the usual ones: kernels have
    # alignment rules for rows that don't fill a tile.
    # Batch 1 too: the ring then passes row slices of grad_out/out to the kernels without copies.
    # K/V heads 2 (grouped-query: the heads are expanded into fresh tensors) and 8 (K/V rows
    # reach the kernels as views of the travelling block).
    shapes = [(2, 64, 256, 2), (2, 128, 256, 2), (1, 128, 256, 2), (2, 64, 24, 2), (2, 8, 24, 2),
              (2, 64, 256, 8), (1, 128, 256, 8), (2, 64, 24, 8)]
    for (kernel, dtype), causal, masked, (batch, head_dim, local_len, kv_heads) in itertools.product(
            cases(device), [False, True], [False, True], shapes):
        if kernel in ("cudnn", "flash") and masked:
            continue  # these kernels take no bias; the selector never gives them a mask
        if kernel == "cudnn" and head_dim not in (64, 128):
            continue  # the selector gives cuDNN only these head dims
        set_block_kernel(kernel)
        try:
            errors = check_rank("ring", 3, 8, batch=batch, hq=8, hkv=kv_heads, local_len=local_len, dim=head_dim, causal=causal,
                                layout="zigzag", dtype=dtype, device=device, masked=masked, seed=1)
            worst = max(errors.values())
            ok = worst <= TOLERANCE[dtype]
            status = "ok" if ok else "FAIL"
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            worst, ok, status = float("nan"), False, f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            set_block_kernel(None)
        failures += not ok
        print(f"{kernel or 'auto':>10} {str(dtype):>15} causal={causal!s:5} mask={masked!s:5} B={batch} Hkv={kv_heads} D={head_dim:3} L={local_len:3}  max rel err {worst:.1e}  {status}")
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Folding one block's (out, lse) into the running (out, lse): the online-softmax merge.

    out' = out + sigmoid(lse_b - lse) * (out_b - out)
    lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|))       (= log(e^lse + e^lse_b))

On CUDA one Triton kernel reads out, out_b, lse and lse_b once and writes out and lse once,
whatever their strides (the block kernels return [B, L, H, D]-strided outputs; the running out
is sliced by rows under zigzag). The eager form is ~10 element-wise kernels and ~11 passes over
an fp32 tensor the size of out — at 4K tokens per rank as long as the block's attention itself.
The eager form is kept for CPU, float64, and machines without Triton.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


def merge_block_eager_(out, lse, block_out, block_lse) -> None:
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out.sub_(weight * (out - block_out.to(out.dtype)))
    lse.copy_(torch.maximum(lse, block_lse) - F.logsigmoid((lse - block_lse).abs()))


@functools.cache
def _triton_merge():
    """The compiled kernel's launcher, or None where Triton isn't installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def merge_kernel(
        out_ptr, lse_ptr, bout_ptr, blse_ptr, heads, rows, dim,
        so_b, so_h, so_l, sl_b, sl_h, sl_l, sbo_b, sbo_h, sbo_l, sbl_b, sbl_h, sbl_l,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(1)
        b, h = bh // heads, bh % heads
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        row_ok = m < rows
        lse = tl.load(lse_ptr + b * sl_b + h * sl_h + m * sl_l, mask=row_ok, other=0.0)
        blse = tl.load(blse_ptr + b * sbl_b + h * sbl_h + m * sbl_l, mask=row_ok, other=0.0).to(tl.float32)
        weight = tl.sigmoid(blse - lse)
        new_lse = tl.maximum(lse, blse) + tl.log(1.0 + tl.exp(-tl.abs(lse - blse)))
        tile_ok = row_ok[:, None] & (d[None, :] < dim)
        o_ptrs = out_ptr + b * so_b + h * so_h + m[:, None] * so_l + d[None, :]
        bo_ptrs = bout_ptr + b * sbo_b + h * sbo_h + m[:, None] * sbo_l + d[None, :]
        out = tl.load(o_ptrs, mask=tile_ok, other=0.0)
        bout = tl.load(bo_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(o_ptrs, out + weight[:, None] * (bout - out), mask=tile_ok)
        tl.store(lse_ptr + b * sl_b + h * sl_h + m * sl_l, new_lse, mask=row_ok)

    def launch(out, lse, block_out, block_lse):
        batch, heads, rows, dim = out.shape
        block_d = triton.next_power_of_2(dim)
        if block_d in (64, 128):
            # Measured on an H200 over every (BLOCK_M, warps) in {16..128} x {2, 4, 8}
            # (benchmarks/diagnostics/merge_configs.py): best or within 3% of it at 4K and 8K
            # rows, and 22% faster than 128 rows x 4 warps for D = 64 at 4K.
            block_m, warps = 32, 8
        else:
            block_m, warps = max(1, min(128, 8192 // block_d)), 4
        grid = (triton.cdiv(rows, block_m), batch * heads)
        merge_kernel[grid](
            out, lse, block_out, block_lse, heads, rows, dim,
            *out.stride()[:3], *lse.stride(), *block_out.stride()[:3], *block_lse.stride(),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )

    return launch


def _fusable(out, lse, block_out, block_lse) -> bool:
    return (
        out.is_cuda and out.dtype == torch.float32 and lse.dtype == torch.float32
        and out.stride(-1) == 1 and block_out.stride(-1) == 1 and block_out.shape == out.shape
        and block_lse.shape == lse.shape
    )


# LIGHTNING_SEQPAR_FUSED_MERGE=0 forces the eager merge (to compare, or to rule the kernel out).
_ENABLED = os.environ.get("LIGHTNING_SEQPAR_FUSED_MERGE", "1") != "0"


def merge_block_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's (out, lse) into the running (out, lse), in place."""
    if _ENABLED and _fusable(out, lse, block_out, block_lse):
        launch = _triton_merge()
        if launch is not None:
            launch(out, lse, block_out, block_lse)
            return
    merge_block_eager_(out, lse, block_out, block_lse)

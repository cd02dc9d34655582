"""Tensors of an op's local rows built from several block calls: the output, merged by the
online softmax from the blocks' (out, lse), and gradients summed from the blocks' partials (dQ
at home; in the ring, dK/dV at their owner).

    out = sum_i exp(lse_i - lse) * out_i,     lse = log(sum_i exp(lse_i))

Each block call covers a range of the local query rows (all of them, or one zigzag half).

On CUDA the blocks are not folded in one at a time. Several block results wait, and one Triton
kernel folds them together in registers, in float32, and writes either the running float32
result or, at the end, the result in the input dtype. Folding one block at a time into a float32
running result reads and writes that float32 tensor once per block: for a ring of 8 the
output's bytes were touched ~80 times. On an H200 that merge took about an eighth of a ring
step's time at 8K tokens per rank, and dQ's float32 add a twentieth of a backward step's.

How many wait is a trade of memory for traffic. The output waits for up to
`OUTPUT_PARTS_PER_FOLD` (8) blocks, so a ring of 8 folds once, straight into the output's dtype:
18 bytes per output element against 26 with two folds of 4, and no float32 running result. It
is a forward-only transient of eight block outputs. Gradients wait for up to
`GRADIENT_PARTS_PER_FOLD` (8) as well: the backward keeps dQ, dK and dV building at once, each
holding its waiting partials, so this costs more memory at the backward's peak than the
output's eight do (measured in `GRADIENT_PARTS_PER_FOLD`'s comment). Either way waiting blocks
are each at most the size of the local rows, so memory stays O(L_local) whatever the ring's
size.

Elsewhere (CPU, float64, no Triton) each block is merged or added as it comes, eagerly, in the
accumulation dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from lightning_seqpar.ops._blocks import EMPTY_LSE, all_rows, row_view
from lightning_seqpar.ops._graphs import clear_cuda_graphs
from lightning_seqpar.ops._kernels import accumulation_dtype, accumulator_like

# Block results one fold kernel launch reads (its argument slots).
KERNEL_SLOTS = 8
# Block results that wait for one fold (see the module's docstring): all of a ring of 8, for the
# output and for each gradient. For gradients the choice was measured together with the
# backward's blocks per call (ring_attention.BLOCKS_PER_BACKWARD_CALL), replayed on an H100,
# simulated N = 8, 4K and 8K tokens per rank (2026-11-26, benchmarks/results/gradient_folds_h100.txt):
# 8 parts with 4 blocks per call took 0.960-0.982 of the forward+backward time of 4 parts with
# 2 in 7 of 8 rows over two rounds (the eighth 1.016), where either change alone was mixed; on
# a second machine 0.965-0.997, faster in 15 of 16 pairs. The pair's price: one rank's
# attention peak 228 -> 260 MiB at L = 16K (N = 8, `attention_memory.py`); the 0.97B model's
# step kept its peak (ratio 1.000 to the model at L/N without SP).
OUTPUT_PARTS_PER_FOLD = 8
GRADIENT_PARTS_PER_FOLD = 8


def set_gradient_parts_per_fold(parts: int) -> None:
    """Gradient partials that wait for one fold on CUDA (1 to `KERNEL_SLOTS`; default 8). For
    measuring: fewer hold less memory and read the float32 running sum more often. Drops
    captured CUDA graphs, since a captured backward keeps the value it was captured with."""
    global GRADIENT_PARTS_PER_FOLD
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= KERNEL_SLOTS:
        raise ValueError(f"set_gradient_parts_per_fold takes a whole number from 1 to {KERNEL_SLOTS}; got {parts!r}")
    GRADIENT_PARTS_PER_FOLD = parts
    clear_cuda_graphs()


def merge_block_eager_(out, lse, block_out, block_lse) -> None:
    """Fold one block into the running (out, lse), in place, with torch element-wise ops:

        out' = out + sigmoid(lse_b - lse) * (out_b - out)
        lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|))
    """
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out.sub_(weight * (out - block_out.to(out.dtype)))
    lse.copy_(torch.maximum(lse, block_lse) - F.logsigmoid((lse - block_lse).abs()))


@functools.cache
def _triton_fold():
    """The fold kernel's launcher, or None where Triton isn't installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def absorb(acc, total, peak, b, h, m, d, d_ok, heads, out_ptr, lse_ptr, start, stop, s_ob, s_oh, s_ol, s_lh,
               WEIGHTED: tl.constexpr):
        # One block result over local rows [start, stop). Weighted: rescale what is summed so
        # far to the new running maximum and add the block with its weight (rows outside the
        # block get lse -inf, so weight 0). Otherwise a plain sum.
        in_block = (m >= start) & (m < stop)
        r = m - start
        part = tl.load(out_ptr + b * s_ob + h * s_oh + r[:, None] * s_ol + d[None, :],
                       mask=in_block[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            lse = tl.load(lse_ptr + (b * heads + h) * s_lh + r, mask=in_block, other=float("-inf")).to(tl.float32)
            new_peak = tl.maximum(peak, lse)
            rescale = tl.exp(peak - new_peak)
            weight = tl.exp(lse - new_peak)
            return acc * rescale[:, None] + weight[:, None] * part, total * rescale + weight, new_peak
        return acc + part, total, peak

    @triton.jit
    def fold_kernel(
        dest_out, dest_lse, run_out, run_lse, heads, rows, dim, s_b, s_h, s_l,
        o0, l0, a0, z0, ob0, oh0, ol0, lh0,
        o1, l1, a1, z1, ob1, oh1, ol1, lh1,
        o2, l2, a2, z2, ob2, oh2, ol2, lh2,
        o3, l3, a3, z3, ob3, oh3, ol3, lh3,
        o4, l4, a4, z4, ob4, oh4, ol4, lh4,
        o5, l5, a5, z5, ob5, oh5, ol5, lh5,
        o6, l6, a6, z6, ob6, oh6, ol6, lh6,
        o7, l7, a7, z7, ob7, oh7, ol7, lh7,
        NUM_PARTS: tl.constexpr, HAS_RUNNING: tl.constexpr, WEIGHTED: tl.constexpr, EMPTY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // heads, bh % heads
        # 64-bit offsets: a long chunk's rows x heads x dim can pass 2^31 elements.
        m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        row_ok, d_ok = m < rows, d < dim
        tile_ok = row_ok[:, None] & d_ok[None, :]
        out_offsets = b * s_b + h * s_h + m[:, None] * s_l + d[None, :]
        lse_offsets = bh * rows + m
        if HAS_RUNNING:
            # The running (out, lse) is one more part, normalised: its weight sum is 1.
            acc = tl.load(run_out + out_offsets, mask=tile_ok, other=0.0)
            total = tl.full([BLOCK_M], 1.0, tl.float32)
            if WEIGHTED:
                peak = tl.maximum(tl.load(run_lse + lse_offsets, mask=row_ok, other=EMPTY), EMPTY)
            else:
                peak = total
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            total = tl.zeros([BLOCK_M], tl.float32)
            # A finite floor keeps exp(peak - new_peak) free of inf - inf.
            peak = tl.full([BLOCK_M], EMPTY, tl.float32)
        acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o0, l0, a0, z0, ob0, oh0, ol0, lh0, WEIGHTED)
        if NUM_PARTS > 1:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o1, l1, a1, z1, ob1, oh1, ol1, lh1, WEIGHTED)
        if NUM_PARTS > 2:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o2, l2, a2, z2, ob2, oh2, ol2, lh2, WEIGHTED)
        if NUM_PARTS > 3:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o3, l3, a3, z3, ob3, oh3, ol3, lh3, WEIGHTED)
        if NUM_PARTS > 4:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o4, l4, a4, z4, ob4, oh4, ol4, lh4, WEIGHTED)
        if NUM_PARTS > 5:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o5, l5, a5, z5, ob5, oh5, ol5, lh5, WEIGHTED)
        if NUM_PARTS > 6:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o6, l6, a6, z6, ob6, oh6, ol6, lh6, WEIGHTED)
        if NUM_PARTS > 7:
            acc, total, peak = absorb(acc, total, peak, b, h, m, d, d_ok, heads, o7, l7, a7, z7, ob7, oh7, ol7, lh7, WEIGHTED)
        if WEIGHTED:
            # A row no block has covered yet keeps out 0 and lse EMPTY.
            total = tl.where(total > 0, total, 1.0)
            acc = acc / total[:, None]
            tl.store(dest_lse + lse_offsets, peak + tl.log(total), mask=row_ok)
        tl.store(dest_out + out_offsets, acc.to(dest_out.dtype.element_ty), mask=tile_ok)

    def launch(parts, running, dest_out, dest_lse, tiles=None):
        """`parts`: up to KERNEL_SLOTS (rows, out, lse or None); `running`: (out, lse or None)
        or None; dest_lse None for a plain sum. `tiles`: (rows per program, warps), to tune."""
        batch, heads, rows, dim = dest_out.shape
        block_d = triton.next_power_of_2(dim)
        # 32 rows per program, a warp per 32 columns: the best or within 12% of the best of every
        # (rows, warps) in {16..128} x {2, 4, 8}, for D = 64 and 128 at 4K and 8K rows, in two
        # runs on H200s (benchmarks/diagnostics/merge_configs.py; the runs disagree by up to 45%
        # on single configurations).
        block_m, warps = tiles or (max(32, 2048 // block_d), max(2, min(8, block_d // 32)))
        weighted = dest_lse is not None
        part_args = []
        for rows_range, out, lse in parts + parts[:1] * (KERNEL_SLOTS - len(parts)):
            lse = lse if weighted else out  # unread
            part_args += [out, lse, rows_range.start, rows_range.stop, *out.stride()[:3], lse.stride(1)]
        run_out, run_lse = running if running is not None else (dest_out, dest_lse)
        grid = (triton.cdiv(rows, block_m), batch * heads)
        fold_kernel[grid](
            dest_out, dest_lse if weighted else dest_out, run_out, run_lse if weighted else dest_out,
            heads, rows, dim, *dest_out.stride()[:3], *part_args,
            NUM_PARTS=len(parts), HAS_RUNNING=running is not None, WEIGHTED=weighted, EMPTY=EMPTY_LSE,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )

    return launch


def fold_reference(parts, running, dest_out, dest_lse) -> None:
    """What the fold kernel computes, in torch ops: the CPU tests run the fused path's
    bookkeeping with it, and `benchmarks/kernel_check.py` compares the kernel with it."""
    acc_dtype = torch.float64 if dest_out.dtype == torch.float64 else torch.float32
    weighted = dest_lse is not None
    rows_shape = dest_out.shape[:3]
    if running is not None:
        acc = running[0].to(acc_dtype).clone()
        total = torch.ones(rows_shape, dtype=acc_dtype, device=acc.device)
        peak = running[1].to(acc_dtype).clamp_min(EMPTY_LSE) if weighted else total
    else:
        acc = torch.zeros(dest_out.shape, dtype=acc_dtype, device=dest_out.device)
        total = torch.zeros(rows_shape, dtype=acc_dtype, device=dest_out.device)
        peak = torch.full(rows_shape, EMPTY_LSE, dtype=acc_dtype, device=dest_out.device)
    for rows, out, lse in parts:
        part = torch.zeros_like(acc)
        row_view(part, rows).copy_(out)
        if not weighted:
            acc += part
            continue
        part_lse = torch.full_like(peak, float("-inf"))
        row_view(part_lse, rows).copy_(lse)
        new_peak = torch.maximum(peak, part_lse)
        rescale, weight = torch.exp(peak - new_peak), torch.exp(part_lse - new_peak)
        acc = acc * rescale.unsqueeze(-1) + weight.unsqueeze(-1) * part
        total, peak = total * rescale + weight, new_peak
    if weighted:
        total = torch.where(total > 0, total, torch.ones_like(total))
        acc = acc / total.unsqueeze(-1)
        dest_lse.copy_(peak + torch.log(total))
    dest_out.copy_(acc)


def _kernel_ready(out: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block result as the fold kernel reads it: unit stride along D and along lse's rows,
    lse's batch stride heads x its head stride (the fused kernels return it so, the efficient
    kernel's row-padded lse too). Copies only what is not."""
    if out.stride(-1) != 1:
        out = out.contiguous()
    if lse is not None and (lse.stride(-1) != 1 or (lse.size(0) > 1 and lse.stride(0) != lse.size(1) * lse.stride(1))):
        lse = lse.contiguous()
    return out, lse


# LIGHTNING_SEQPAR_FUSED_MERGE=0 forces the eager merge (to compare, or to rule the kernel out).
_ENABLED = os.environ.get("LIGHTNING_SEQPAR_FUSED_MERGE", "1") != "0"


def _fused_fold(q: torch.Tensor):
    """The fold kernel's launcher for blocks of `q`'s rows, or None where it doesn't apply."""
    if _ENABLED and q.is_cuda and accumulation_dtype(q.dtype) == torch.float32:
        return _triton_fold()
    return None


class _BlockFold:
    """A tensor shaped like the local rows of `q` (named for the queries; the ring passes k or v
    to build their gradients), built from block results that each cover a range of those rows:
    merged by their lse (`weighted`) or summed. Up to `parts_per_fold` blocks wait for one
    fused fold on CUDA; eagerly, one waits (a call of one block returns it as it is) and the
    rest are merged or added as they come, in the accumulation dtype."""

    weighted: bool

    @staticmethod
    def parts_per_fold() -> int:
        raise NotImplementedError

    def __init__(self, q: torch.Tensor, kernel):
        self.q, self.kernel = q, kernel
        self.acc = accumulation_dtype(q.dtype)
        self._fold = _fused_fold(q)
        self._limit = self.parts_per_fold() if self._fold is not None else 1
        self._parts: list[tuple[slice, torch.Tensor, torch.Tensor | None]] = []
        self._running: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _add(self, rows: slice, block: torch.Tensor, block_lse: torch.Tensor | None) -> None:
        if len(self._parts) == self._limit:
            self._fold_waiting(*self._running_buffers())
        if self._fold is not None:
            block, block_lse = _kernel_ready(block, block_lse)
        self._parts.append((rows, block, block_lse))

    def _result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._running is None and len(self._parts) == 1 and all_rows(self._parts[0][0], self.q):
            return self._parts[0][1].to(self.q.dtype), self._parts[0][2]
        if self._fold is None:
            self._fold_waiting(*self._running_buffers())
            out, lse = self._running
            return out.to(self.q.dtype), lse
        # The last fold writes the result in q's dtype: no float32 tensor to convert after.
        out, lse = accumulator_like(self.q, self.q.dtype, self.kernel), self._new_lse()
        self._fold_waiting(out, lse)
        return out, lse

    def _new_lse(self) -> torch.Tensor | None:
        return torch.empty(self.q.shape[:3], dtype=self.acc, device=self.q.device) if self.weighted else None

    def _running_buffers(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._running is None:
            return accumulator_like(self.q, self.acc, self.kernel), self._new_lse()
        return self._running

    def _fold_waiting(self, dest: torch.Tensor, dest_lse: torch.Tensor | None) -> None:
        """Fold the waiting blocks and the running result, if any, into `dest` (which may be
        the running buffers themselves); `dest` is the running result from then on."""
        if self._fold is not None:
            self._fold(self._parts, self._running, dest, dest_lse)
        else:
            self._fold_eagerly(dest, dest_lse)
        self._running = dest, dest_lse
        self._parts = []

    def _fold_eagerly(self, dest: torch.Tensor, dest_lse: torch.Tensor | None) -> None:
        parts = self._parts
        if self._running is None:
            rows, block, block_lse = parts[0]
            if all_rows(rows, self.q):
                # The first block that covers every row is copied, not folded into zeros.
                dest.copy_(block)
                if self.weighted:
                    dest_lse.copy_(block_lse)
                parts = parts[1:]
            else:
                dest.zero_()
                if self.weighted:
                    # "No key seen yet": merging a block into it gives exactly the block.
                    dest_lse.fill_(EMPTY_LSE)
        for rows, block, block_lse in parts:
            if self.weighted:
                merge_block_eager_(row_view(dest, rows), row_view(dest_lse, rows), block, block_lse)
            else:
                row_view(dest, rows).add_(block)


class MergedOutput(_BlockFold):
    """The local output of one op call from its blocks' (out, lse):

        merged = MergedOutput(q, kernel)
        for each block call: merged.add(query_rows, block_out, block_lse)
        out, lse = merged.result()

    `block_lse` is `[B, H, rows]` in the accumulation dtype, `EMPTY_LSE` where a row saw no
    key. `result()` gives the output in q's dtype (stored as `kernel` stores its outputs) and
    the lse in the accumulation dtype; rows no block covered come back as out 0, lse
    `EMPTY_LSE`.
    """

    weighted = True

    @staticmethod
    def parts_per_fold() -> int:
        return OUTPUT_PARTS_PER_FOLD

    def add(self, rows: slice, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
        self._add(rows, block_out, block_lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._result()


class SummedRows(_BlockFold):
    """A gradient of one op call from its blocks' partials (dQ from each block's dQ; the ring's
    dK/dV from every rank's partials for the local block): `add(rows, partial)`, then
    `result()` is the sum in the dtype of the tensor it was built for, accumulated in the
    accumulation dtype; rows no block covered are 0."""

    weighted = False

    @staticmethod
    def parts_per_fold() -> int:
        # Read at every call: `set_gradient_parts_per_fold` changes it.
        return GRADIENT_PARTS_PER_FOLD

    def add(self, rows: slice, block: torch.Tensor) -> None:
        self._add(rows, block, None)

    def result(self) -> torch.Tensor:
        return self._result()[0]

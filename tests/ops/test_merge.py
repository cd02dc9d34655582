"""The ops' outputs and dQ are built from block results that each cover a range of the local
rows (`_merge.MergedOutput`, `_merge.SummedRows`). Eagerly, each block is folded in as it comes;
on CUDA several blocks wait (`OUTPUT_PARTS_PER_FOLD`, `GRADIENT_PARTS_PER_FOLD`) and one kernel
folds them with the running result.
Here both paths run on CPU: the fused one with `fold_reference`, the kernel's arithmetic in torch
ops (`benchmarks/kernel_check.py` compares the Triton kernel with it on a GPU). Each is compared
with softmax attention over all of a row's keys at once, in float64 (relative error <= 1e-12),
and the simulated rank of an 8-rank group (so 8 blocks and more: several folds) with SDPA on the
global sequence (<= 1e-10)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.simulated_ring import check_rank
from lightning_seqpar.ops import _merge
from lightning_seqpar.ops._blocks import EMPTY_LSE
from lightning_seqpar.ops._kernels import KERNELS

B, H, L, D = 2, 3, 8, 4
ALL, FIRST, SECOND = slice(0, L), slice(0, L // 2), slice(L // 2, L)
# Query rows of each block call: as the ring's (all rows first, then halves or all) and as the
# all-gather op's (halves, the first not covering every row), longer than one fold.
PATTERNS = {
    "one block": [ALL],
    "ring of 8": [ALL, ALL, SECOND, FIRST, ALL, SECOND, FIRST, ALL],
    "ring of 9 halves": [ALL] + [FIRST, SECOND] * 4,
    "all-gather": [FIRST, SECOND, SECOND],
    "rows left out": [FIRST, FIRST],
}


def _fold_with_reference(monkeypatch) -> list:
    """Route the fused path to `fold_reference`; returns the folds' record: (blocks, whether a
    running result came in, dtype written)."""
    calls = []

    def reference(parts, running, dest, dest_lse):
        calls.append((len(parts), running is not None, dest.dtype))
        _merge.fold_reference(parts, running, dest, dest_lse)

    monkeypatch.setattr(_merge, "_fused_fold", lambda q: reference)
    return calls


@pytest.fixture(params=["eager", "fused"])
def fold_path(request, monkeypatch):
    return _fold_with_reference(monkeypatch) if request.param == "fused" else None


def _blocks(rows_list, dtype=torch.float64, empty_rows=()):
    """Block calls of `q` on fresh keys each: (rows, keys, values, out, lse); the query rows in
    `empty_rows` see no key in block 1 (as a key padding mask leaves them), so out 0, lse EMPTY."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=gen, dtype=dtype)
    blocks = []
    for i, rows in enumerate(rows_list):
        keys = 3 + i % 4
        k, v = (torch.randn(B, H, keys, D, generator=gen, dtype=dtype) for _ in range(2))
        scores = q[:, :, rows] @ k.transpose(-1, -2) / math.sqrt(D)
        lse = torch.logsumexp(scores, -1)
        out = torch.softmax(scores, -1) @ v
        if i == 1:
            for row in empty_rows:
                if rows.start <= row < rows.stop:
                    lse[:, :, row - rows.start] = EMPTY_LSE
                    out[:, :, row - rows.start] = 0
                    scores[:, :, row - rows.start] = float("-inf")
        blocks.append((rows, scores, v, out, lse))
    return q, blocks


def _attention_over_all_keys(q, blocks):
    """Each row's softmax over the keys of every block that covers it, at once."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=q.dtype)
    for row in range(L):
        covering = [(scores[:, :, row - rows.start], v) for rows, scores, v, _, _ in blocks if rows.start <= row < rows.stop]
        if not covering:
            continue
        scores = torch.cat([s for s, _ in covering], -1)
        values = torch.cat([v for _, v in covering], -2)
        lse[:, :, row] = torch.logsumexp(scores, -1)
        out[:, :, row] = (torch.softmax(scores, -1).nan_to_num(0.0).unsqueeze(-2) @ values).squeeze(-2)
    return out, lse


def _relative(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_merged_output_is_attention_over_every_block(fold_path, pattern):
    q, blocks = _blocks(PATTERNS[pattern], empty_rows=(1, 6))
    merged = _merge.MergedOutput(q, KERNELS["math"])
    for rows, _, _, out, lse in blocks:
        merged.add(rows, out, lse)
    out, lse = merged.result()
    want_out, want_lse = _attention_over_all_keys(q, blocks)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert _relative(out, want_out) <= 1e-12
    seen = torch.isfinite(want_lse)
    assert _relative(lse[seen], want_lse[seen]) <= 1e-12
    # Rows no block covers: out 0 and "no key seen" (the ops turn it into +inf).
    assert torch.all(lse[~seen] <= EMPTY_LSE / 2) and torch.all(out[~seen] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_summed_rows_is_the_sum_of_every_block(fold_path, pattern, dtype):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, L, D, generator=gen).to(dtype)
    blocks = [(rows, torch.randn(B, H, rows.stop - rows.start, D, generator=gen).to(dtype)) for rows in PATTERNS[pattern]]
    summed = _merge.SummedRows(q, KERNELS["math"])
    want = torch.zeros(q.shape, dtype=torch.float64)
    for rows, block in blocks:
        summed.add(rows, block)
        want[:, :, rows] += block.double()
    got = summed.result()
    assert got.dtype == dtype and got.shape == q.shape
    # The sum is kept in float32 (float64 for float64) and rounded to the input dtype once.
    tolerance = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert _relative(got.double(), want.to(dtype).double()) <= tolerance


def test_fused_output_folds_a_ring_of_eight_once_and_more_in_eights(monkeypatch):
    """A ring of 8 blocks: one fold, straight into the output's dtype (no float32 running
    result). 9 blocks: a fold of 8 into a float32 running result, then the last block with it."""
    folds = _fold_with_reference(monkeypatch)
    assert _merge.OUTPUT_PARTS_PER_FOLD == 8 <= _merge.KERNEL_SLOTS
    for pattern, want_folds in [
        ("ring of 8", [(8, False, torch.bfloat16)]),
        ("ring of 9 halves", [(8, False, torch.float32), (1, True, torch.bfloat16)]),
    ]:
        folds.clear()
        q, blocks = _blocks(PATTERNS[pattern], dtype=torch.float32)
        merged = _merge.MergedOutput(q.bfloat16(), KERNELS["math"])
        for rows, _, _, out, lse in blocks:
            merged.add(rows, out.bfloat16(), lse)
        out, _ = merged.result()
        assert folds == want_folds, pattern
        want, _ = _attention_over_all_keys(q, blocks)
        assert out.dtype == torch.bfloat16 and _relative(out.float(), want) <= 8e-3


@pytest.mark.parametrize("parts,want_folds", [
    # The default: 9 blocks fold as 8 into a float32 running sum, then the last one with it
    # into the gradient's dtype.
    (None, [(8, False, torch.float32), (1, True, torch.bfloat16)]),
    (4, [(4, False, torch.float32), (4, True, torch.float32), (1, True, torch.bfloat16)]),
])
def test_fused_gradient_folds_wait_for_their_parts(monkeypatch, parts, want_folds):
    folds = _fold_with_reference(monkeypatch)
    assert _merge.GRADIENT_PARTS_PER_FOLD == 8 <= _merge.KERNEL_SLOTS
    if parts is not None:
        monkeypatch.setattr(_merge, "GRADIENT_PARTS_PER_FOLD", _merge.GRADIENT_PARTS_PER_FOLD)  # restored after
        _merge.set_gradient_parts_per_fold(parts)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, L, D, generator=gen).bfloat16()
    summed, want = _merge.SummedRows(q, KERNELS["math"]), torch.zeros(q.shape, dtype=torch.float64)
    for rows in PATTERNS["ring of 9 halves"]:
        block = torch.randn(B, H, rows.stop - rows.start, D, generator=gen).bfloat16()
        summed.add(rows, block)
        want[:, :, rows] += block.double()
    got = summed.result()
    assert folds == want_folds
    assert got.dtype == torch.bfloat16 and _relative(got.double(), want) <= 8e-3


@pytest.mark.parametrize("bad", [0, 9, 2.0, True, "4"])
def test_gradient_parts_per_fold_takes_what_the_kernel_has_slots_for(bad):
    with pytest.raises(ValueError, match="set_gradient_parts_per_fold takes a whole number from 1 to 8"):
        _merge.set_gradient_parts_per_fold(bad)
    assert _merge.GRADIENT_PARTS_PER_FOLD == 8


def test_one_block_over_every_row_comes_back_as_it_is(fold_path):
    q, blocks = _blocks([ALL])
    merged = _merge.MergedOutput(q, KERNELS["math"])
    merged.add(ALL, blocks[0][3], blocks[0][4])
    out, lse = merged.result()
    assert out is blocks[0][3] and lse is blocks[0][4]
    assert fold_path in (None, [])


@pytest.mark.parametrize("algo", ["ring", "allgather"])
@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "zigzag"), (True, "contiguous")])
def test_simulated_rank_of_eight_through_both_paths(fold_path, algo, causal, layout):
    for rank in (0, 3, 7):
        errors = check_rank(
            algo, rank, 8, batch=2, hq=4, hkv=2, local_len=12, dim=8, causal=causal, layout=layout,
            dtype=torch.float64, device="cpu", masked=True, seed=rank,
        )
        assert max(errors.values()) <= 1e-10, f"rank {rank}: {errors}"

"""What the ring may allocate, which block calls it makes, and the math fallback kernel."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_seqpar.layout import shard_sequence, unshard_sequence
from lightning_seqpar.ops import ATTENTION_OPS, set_block_kernel
from tests.ops.test_attention import TOLERANCE, blocks_per_backward_call, make_inputs, reference, relative_error, run_shard

LOCAL_LEN = 64


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, and the fused block calls made."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.block_calls: list[tuple[int, int]] = []
        self.backward_calls: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.block_calls.append((args[0].size(2), args[1].size(2)))
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            self.backward_calls.append((args[1].size(2), args[2].size(2)))
        return result


def largest_tensor(algo, causal, layout, blocks=None):
    """The largest tensor and the block calls of one op call on this rank; the ring's backward
    with `blocks` visiting blocks per call if given."""
    world_size = dist.get_world_size()
    q, k, v = (torch.randn(1, 1, LOCAL_LEN, 4, requires_grad=True) for _ in range(3))
    with blocks_per_backward_call(blocks):
        # Once unrecorded first: the kernels' one-time probes (grouped heads) are not the op's calls.
        ATTENTION_OPS[algo](q, k, v, causal=causal, layout=layout).sum().backward()
        with LargestTensor() as mode:
            ATTENTION_OPS[algo](q, k, v, causal=causal, layout=layout).sum().backward()
    return mode.largest, (mode.block_calls, mode.backward_calls), world_size


@pytest.mark.parametrize("causal", [False, True])
def test_ring_never_allocates_local_by_global(process_pools, causal):
    for largest, _, world_size in process_pools(4).run_ok(largest_tensor, "ring", causal, "zigzag"):
        assert largest < LOCAL_LEN * LOCAL_LEN * world_size // 2
    # RSA, for contrast, holds the full score rows by design.
    for largest, _, world_size in process_pools(4).run_ok(largest_tensor, "rsa", causal, "zigzag"):
        assert largest >= LOCAL_LEN * LOCAL_LEN * world_size


def test_causal_block_calls_skip_masked_steps_and_balance_zigzag(process_pools):
    """Contiguous: rank r computes r + 1 blocks (the masked ones are skipped, not computed).
    Zigzag: every rank computes its causal diagonal and W - 1 half blocks, in both passes."""
    contiguous = [calls for _, calls, _ in process_pools(4).run_ok(largest_tensor, "ring", True, "contiguous", 1)]
    for rank, (forward, backward) in enumerate(contiguous):
        assert len(forward) == len(backward) == rank + 1
    zigzag = [calls for _, calls, _ in process_pools(4).run_ok(largest_tensor, "ring", True, "zigzag", 1)]
    for forward, backward in zigzag:
        for calls in (forward, backward):
            assert calls[0] == (LOCAL_LEN, LOCAL_LEN)
            assert len(calls) == 4 and all(q * k == LOCAL_LEN * LOCAL_LEN // 2 for q, k in calls[1:])


def test_a_backward_of_two_blocks_per_call_computes_the_same_cells_in_fewer_calls(process_pools):
    """With two visiting blocks per backward call (steps 1-2, then 3), blocks that all precede
    the rank, or all follow it under zigzag, share one call; the cells computed are the
    forward's."""
    world_size, half_block = 4, LOCAL_LEN * LOCAL_LEN // 2
    contiguous = [calls for _, calls, _ in process_pools(world_size).run_ok(largest_tensor, "ring", True, "contiguous", 2)]
    for rank, (forward, backward) in enumerate(contiguous):
        assert len(forward) == rank + 1
        assert len(backward) == 1 + sum(any(s <= rank for s in steps) for steps in [(1, 2), (3,)])
        assert sum(q * k for q, k in backward) == sum(q * k for q, k in forward) == (rank + 1) * LOCAL_LEN * LOCAL_LEN
    zigzag = [calls for _, calls, _ in process_pools(world_size).run_ok(largest_tensor, "ring", True, "zigzag", 2)]
    for rank, (forward, backward) in enumerate(zigzag):
        assert forward[0] == backward[0] == (LOCAL_LEN, LOCAL_LEN)
        assert len(forward) == 4 and all(q * k == half_block for q, k in forward[1:])
        kinds = [{(rank - s) % world_size < rank for s in steps} for steps in [(1, 2), (3,)]]
        assert len(backward) == 1 + sum(len(k) for k in kinds)
        assert sum(q * k for q, k in backward[1:]) == (world_size - 1) * half_block


def run_with_kernel(kernel, *args):
    set_block_kernel(kernel)
    try:
        return run_shard(*args)
    finally:
        set_block_kernel(None)


MATH_CASES = list(itertools.product([False, True], ["contiguous", "zigzag"], [(4, 2)], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal,layout,heads,masked", MATH_CASES)
def test_math_fallback_kernel(process_pools, dtype, causal, layout, heads, masked):
    """The kernel used where no fused one applies must be exact too."""
    seed = 7
    results = process_pools(3).run_ok(run_with_kernel, "math", "ring", seed, *heads, dtype, masked, causal, layout)
    q, k, v, dout, mask = make_inputs(seed, 3, *heads, dtype, masked)
    expected = reference(q, k, v, dout, mask, causal)
    for i in range(4):
        got = unshard_sequence([r[i] for r in results], 2, layout)
        assert relative_error(got, expected[i]) <= TOLERANCE[dtype]


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="unknown block kernel 'triton'"):
        set_block_kernel("triton")


def test_kernel_environment_variable_is_checked_at_import(monkeypatch):
    """LIGHTNING_SEQPAR_KERNEL is read when the package is imported (`_kernel_from_environment`
    gives the starting override): a bad name fails there, naming the fix, not at the first
    call, on that rank alone, inside the ring."""
    from lightning_seqpar.ops import _kernels

    monkeypatch.setenv(_kernels.KERNEL_ENV, "math")
    assert _kernels._kernel_from_environment() == "math"
    monkeypatch.setenv(_kernels.KERNEL_ENV, "")
    assert _kernels._kernel_from_environment() is None
    monkeypatch.delenv(_kernels.KERNEL_ENV)
    assert _kernels._kernel_from_environment() is None
    monkeypatch.setenv(_kernels.KERNEL_ENV, "triton")
    with pytest.raises(ValueError, match=r"LIGHTNING_SEQPAR_KERNEL='triton' names no block kernel: set it to one of .* or unset it"):
        _kernels._kernel_from_environment()


@pytest.mark.parametrize("kernel_name", ["math", "cpu_flash"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_kernels_take_row_views(kernel_name, dtype, causal, masked):
    """The ops hand the kernels row ranges of longer tensors as views (no copy per ring step):
    the results must be bit-identical to those on contiguous copies of the same rows."""
    from lightning_seqpar.ops._kernels import KERNELS

    kernel = KERNELS[kernel_name]
    gen = torch.Generator().manual_seed(3)
    whole_q = torch.randn(2, 4, 96, 16, generator=gen, dtype=dtype)
    whole_kv = torch.randn(2, 2, 4, 96, 16, generator=gen, dtype=dtype)
    q, k, v = whole_q.narrow(2, 48, 48), whole_kv[0].narrow(2, 16, 48), whole_kv[1].narrow(2, 16, 48)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    bias = None
    if masked:
        bias = torch.zeros(2, 1, 1, 48, dtype=dtype)
        bias[0, ..., 30:] = float("-inf")
    views = kernel.forward(q, k, v, scale=0.25, causal=causal, bias=bias)
    copies = kernel.forward(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.25, causal=causal, bias=bias)
    dout = torch.randn(views[0].shape, generator=gen, dtype=dtype)
    grads_views = kernel.backward(dout, q, k, v, *copies, scale=0.25, causal=causal, bias=bias)
    grads_copies = kernel.backward(dout, q.contiguous(), k.contiguous(), v.contiguous(), *copies, scale=0.25, causal=causal, bias=bias)
    for got, expected in zip((*views, *grads_views), (*copies, *grads_copies)):
        assert torch.equal(got, expected)


def test_grouped_heads_probe():
    """Grouped K/V heads go to a kernel unexpanded only where it was seen to handle them: the
    CPU flash kernel does on this torch; the math kernel, a kernel that rejects the head
    mismatch and one that mishandles it are given expanded K/V."""
    from lightning_seqpar.ops._kernels import KERNELS, MathKernel, head_expansion, takes_grouped_heads

    q, k = torch.zeros(1, 8, 4, 16), torch.zeros(1, 2, 4, 16)
    assert takes_grouped_heads(KERNELS["cpu_flash"], q) and head_expansion(KERNELS["cpu_flash"], q, k) == 1
    assert not takes_grouped_heads(KERNELS["math"], q) and head_expansion(KERNELS["math"], q, k) == 4

    class Rejects(MathKernel):
        name, grouped_heads = "test_rejects", True  # MathKernel's matmul fails on the head mismatch

    class InterleavedGroups(MathKernel):
        """Exact on equal head counts; given grouped heads, maps query head h to K/V head
        h % Hkv instead of h // (Hq / Hkv): a grouping that differs from the ops' only when
        there are several K/V heads."""

        name, grouped_heads = "test_interleaved_groups", True

        @staticmethod
        def _spread(q, k):
            return torch.arange(q.size(1)) % k.size(1)

        def forward(self, q, k, v, **kw):
            idx = self._spread(q, k)
            return super().forward(q, k[:, idx], v[:, idx], **kw)

        def backward(self, dout, q, k, v, out, lse, **kw):
            idx = self._spread(q, k)
            dq, dk, dv = super().backward(dout, q, k[:, idx], v[:, idx], out, lse, **kw)
            return dq, torch.zeros_like(k).index_add_(1, idx, dk), torch.zeros_like(v).index_add_(1, idx, dv)

    assert not takes_grouped_heads(Rejects(), q)
    assert not takes_grouped_heads(InterleavedGroups(), torch.zeros(1, 8, 4, 16, dtype=torch.float64))
    # Its grouping is wrong, not its arithmetic: with one K/V head it would have passed.
    q1, k1 = torch.randn(1, 2, 4, 16, dtype=torch.float64), torch.randn(1, 1, 4, 16, dtype=torch.float64)
    grouped = InterleavedGroups().forward(q1, k1, k1, scale=0.25, causal=False, bias=None)[0]
    expanded = MathKernel().forward(q1, k1.expand_as(q1), k1.expand_as(q1), scale=0.25, causal=False, bias=None)[0]
    assert torch.equal(grouped, expanded)

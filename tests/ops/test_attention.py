"""The attention algorithms against `F.scaled_dot_product_attention` on the whole sequence in
one process: the gathered output and the gradients of q, k and v.

Tolerance: relative Frobenius error ||x - ref|| / ||ref|| <= 1e-10 in float64 and <= 1e-5 in
float32, for every output and gradient.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seqpar.layout import shard_sequence, unshard_sequence
from lightning_seqpar.ops import ATTENTION_OPS, backward_blocks_per_call, set_backward_blocks_per_call
from lightning_seqpar.ops._common import stack_kv

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
PIECE = 3  # tokens per layout piece: odd, so nothing lines up with powers of two by accident
BATCH, HEAD_DIM = 2, 8


def make_inputs(seed, world_size, hq, hkv, dtype, masked):
    """Global q, k, v, upstream gradient and key padding mask, identical on every process."""
    seq_len = 2 * world_size * PIECE
    gen = torch.Generator().manual_seed(seed)

    def randn(heads):
        return torch.randn(BATCH, heads, seq_len, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v, dout = randn(hq), randn(hkv), randn(hkv), randn(hq)
    mask = None
    if masked:
        mask = torch.ones(BATCH, seq_len, dtype=torch.bool)
        # Right padding that leaves the later ranks of a contiguous cut with no real key at all,
        # and left padding whose first queries see no real key under a causal mask.
        mask[0, seq_len // 3 :] = False
        mask[1, :2] = False
    return q, k, v, dout, mask


def reference(q, k, v, dout, mask, causal):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    attn_mask = None
    if mask is not None or causal:
        length = q.size(2)
        attn_mask = torch.ones(BATCH, 1, length, length, dtype=torch.bool)
        if mask is not None:
            attn_mask &= mask[:, None, None, :]
        if causal:
            attn_mask &= torch.ones(length, length, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def run_shard(algo, seed, hq, hkv, dtype, masked, causal, layout):
    """One rank's part: shard the global inputs, run the op, backpropagate the sharded dout."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    q, k, v, dout, mask = make_inputs(seed, world_size, hq, hkv, dtype, masked)
    local = [shard_sequence(t, 2, rank, world_size, layout).clone().requires_grad_() for t in (q, k, v)]
    local_mask = None if mask is None else shard_sequence(mask, 1, rank, world_size, layout)
    out = ATTENTION_OPS[algo](*local, causal=causal, layout=layout, key_padding_mask=local_mask)
    out.backward(shard_sequence(dout, 2, rank, world_size, layout))
    return [out.detach()] + [t.grad for t in local]


def relative_error(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


HEADS = [(4, 4), (4, 2), (4, 1)]
ALGOS = ["ring", "rsa", "allgather"]
CASES = list(itertools.product(ALGOS, [False, True], ["contiguous", "zigzag"], HEADS, [False, True]))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "algo,causal,layout,heads,masked",
    CASES,
    ids=[f"{a}-{'causal' if c else 'full'}-{lay}-h{h[0]}kv{h[1]}-{'mask' if m else 'nomask'}" for a, c, lay, h, m in CASES],
)
def test_matches_single_process_sdpa(process_pools, world_size, dtype, algo, causal, layout, heads, masked):
    seed = hash((world_size, str(dtype), algo, causal, layout, heads, masked)) % 2**31
    results = process_pools(world_size).run_ok(run_shard, algo, seed, *heads, dtype, masked, causal, layout)
    q, k, v, dout, mask = make_inputs(seed, world_size, *heads, dtype, masked)
    expected = reference(q, k, v, dout, mask, causal)
    for name, i in zip(["out", "dq", "dk", "dv"], range(4)):
        got = unshard_sequence([r[i] for r in results], 2, layout)
        assert got.dtype == dtype
        err = relative_error(got, expected[i])
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("algo", ALGOS)
def test_rows_without_keys_are_zero_with_zero_gradient(algo):
    """A query that sees no real key (left padding under a causal mask) attends to nothing."""
    q, k, v, dout, mask = make_inputs(0, 1, 4, 2, torch.float64, masked=True)
    q.requires_grad_()
    out = ATTENTION_OPS[algo](q, k, v, causal=True, key_padding_mask=mask)
    out.backward(dout)
    assert out[1, :, :2].abs().max() == 0
    assert q.grad[1, :, :2].abs().max() == 0
    assert out[1, :, 2:].abs().min() > 0


def test_group_of_one_is_sdpa_with_scale():
    q, k, v, dout, _ = make_inputs(1, 1, 4, 2, torch.float32, masked=False)
    for algo, causal in itertools.product(ALGOS, [False, True]):
        out = ATTENTION_OPS[algo](q, k, v, causal=causal, scale=0.3)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
        assert relative_error(out, ref) <= 1e-6


@pytest.mark.parametrize("algo", ALGOS)
def test_autocast_casts_inputs_like_sdpa(algo):
    """Under autocast, mixed float32/bf16 inputs (RoPE'd q, k beside a bf16 v) are cast to the
    autocast dtype as SDPA's are, and the gradients flow back in each input's own dtype."""
    q, k, v, dout, _ = make_inputs(3, 1, 4, 2, torch.float32, masked=False)
    q, k = q.requires_grad_(), k.requires_grad_()
    v = v.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ATTENTION_OPS[algo](q, k, v, causal=True)
        ref = F.scaled_dot_product_attention(q, k, v.float(), is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), ref.float()) <= 2e-2
    out.float().backward(dout)
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16


def run_shard_kv_side_by_side(algo, seed, hq, hkv, dtype, causal, layout):
    """`run_shard` with the local K and V as the two halves of one tensor, as a CUDA graph's
    input copies lay them out: the op sends them as they lie (`stack_kv` views them) instead of
    stacking them. Returns the output and dQ, dK, dV, and whether the view was taken."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    q, k, v, dout, _ = make_inputs(seed, world_size, hq, hkv, dtype, masked=False)
    q = shard_sequence(q, 2, rank, world_size, layout).clone().requires_grad_()
    kv = torch.stack([shard_sequence(t, 2, rank, world_size, layout) for t in (k, v)]).requires_grad_()
    k_local, v_local = kv.unbind(0)
    viewed = stack_kv(k_local, v_local).data_ptr() == kv.data_ptr()
    out = ATTENTION_OPS[algo](q, k_local, v_local, causal=causal, layout=layout)
    out.backward(shard_sequence(dout, 2, rank, world_size, layout))
    return [out.detach(), q.grad, kv.grad[0], kv.grad[1]], viewed


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("algo", ["ring", "allgather"])
@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "zigzag")])
def test_k_and_v_side_by_side_travel_as_they_lie(process_pools, world_size, algo, causal, layout):
    seed = 17 + world_size
    results = process_pools(world_size).run_ok(run_shard_kv_side_by_side, algo, seed, 4, 2, torch.float64, causal, layout)
    assert all(viewed for _, viewed in results)
    q, k, v, dout, _ = make_inputs(seed, world_size, 4, 2, torch.float64, masked=False)
    expected = reference(q, k, v, dout, None, causal)
    for name, i in zip(["out", "dq", "dk", "dv"], range(4)):
        got = unshard_sequence([r[i] for r, _ in results], 2, layout)
        err = relative_error(got, expected[i])
        assert err <= TOLERANCE[torch.float64], f"{name}: relative error {err:.2e}"


def test_stack_kv_views_only_what_lies_side_by_side():
    kv = torch.randn(2, 2, 3, 5, 4)
    k, v = kv.unbind(0)
    assert stack_kv(k, v).data_ptr() == kv.data_ptr() and torch.equal(stack_kv(k, v), kv)
    # Apart, swapped, or not contiguous: a fresh stack, equal to torch.stack.
    for first, second in [(k.clone(), v.clone()), (v, k), (k.transpose(2, 3), v.transpose(2, 3))]:
        stacked = stack_kv(first, second)
        assert stacked.data_ptr() not in (first.data_ptr(), second.data_ptr())
        assert torch.equal(stacked, torch.stack([first, second]))


@contextlib.contextmanager
def blocks_per_backward_call(blocks: int | None):
    """The ring's backward gives `blocks` visiting blocks to one call inside (None: as set)."""
    saved = backward_blocks_per_call()
    if blocks is not None:
        set_backward_blocks_per_call(blocks)
    try:
        yield
    finally:
        set_backward_blocks_per_call(saved)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_backward_blocks_per_call_rejects_anything_but_a_whole_number_from_one(bad):
    before = backward_blocks_per_call()
    with pytest.raises(ValueError, match="at least 1"):
        set_backward_blocks_per_call(bad)
    assert backward_blocks_per_call() == before


def test_setting_backward_blocks_per_call_drops_captured_graphs(monkeypatch):
    """A captured backward keeps the value it was captured with, so the setter must drop it."""
    from lightning_seqpar.ops import _graphs

    before = backward_blocks_per_call()
    monkeypatch.setitem(_graphs._CACHE, "stand-in signature", object())
    with blocks_per_backward_call(before + 1):
        assert backward_blocks_per_call() == before + 1 and not _graphs._CACHE
    assert backward_blocks_per_call() == before


def run_ring_shard_blocks_per_call(blocks, *args):
    """`run_shard` of the ring whose backward gives `blocks` visiting blocks to one call."""
    with blocks_per_backward_call(blocks):
        return run_shard("ring", *args)


def check_ring_blocks_per_call(pool, blocks, seed, causal, layout, masked):
    """The ring over `pool`'s ranks, `blocks` visiting blocks per backward call (None: as set),
    against SDPA on the whole sequence in float64: out, dq, dk and dv."""
    results = pool.run_ok(run_ring_shard_blocks_per_call, blocks, seed, 4, 2, torch.float64, masked, causal, layout)
    expected = reference(*make_inputs(seed, pool.world_size, 4, 2, torch.float64, masked), causal)
    for name, i in zip(["out", "dq", "dk", "dv"], range(4)):
        err = relative_error(unshard_sequence([r[i] for r in results], 2, layout), expected[i])
        assert err <= TOLERANCE[torch.float64], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "contiguous"), (True, "zigzag")])
@pytest.mark.parametrize("world_size", [3, 4])
def test_ring_backward_matches_sdpa_for_any_blocks_per_call(process_pools, world_size, causal, layout, masked, blocks):
    """The default (four blocks per backward call) runs in `test_matches_single_process_sdpa`
    (at 4 ranks one visit of three blocks, whose pieces don't all lie side by side in the
    buffer) and in `test_ring_backward_visits_of_four_blocks`. Here one block per call uses
    each block alone, and two pair blocks of one kind and of both kinds, with a visit of one
    left over at 4 ranks."""
    check_ring_blocks_per_call(process_pools(world_size), blocks, 101 + 7 * world_size + blocks, causal, layout, masked)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "zigzag")])
def test_ring_backward_visits_of_four_blocks(process_pools, causal, layout, masked):
    """The default backward at 6 ranks: the own block, one visit of four blocks (steps 1-4, in
    one buffer whose pieces don't all lie side by side under zigzag), then a visit of one;
    against SDPA on the whole sequence in float64."""
    assert backward_blocks_per_call() == 4  # the default, as the workers hold it
    check_ring_blocks_per_call(process_pools(6), None, 211 + int(causal) + 2 * int(masked), causal, layout, masked)

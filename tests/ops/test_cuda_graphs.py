"""The ring replayed from CUDA graphs (`set_cuda_graphs`).

On CPU (here and in CI): the setting leaves every call eager, with results bit for bit those of
the eager ring on gloo, 2 and 4 ranks, and nothing captured. The signature bookkeeping is
checked with the capture itself stubbed out, and so is dropping a group's graphs when
`destroy_process_group` destroys it (gloo, 2 and 4 ranks).

On a CUDA machine: one simulated rank of a ring of 4 (NCCL transfers to itself, the benchmarks'
harness) makes five calls with fresh inputs each (eager, capture + replay, three replays), with
and without a key padding mask that changes from call to call (on two GPUs with CuPy, again with
the simulated transfers going to the other GPU and back);
every call's output and dQ/dK/dV must match SDPA on the whole sequence (float64 reference;
relative Frobenius error <= 1e-5 in float32, 2e-2 in bfloat16), and exactly one graph per pass
must exist; under "auto", short chunks must take the replayed ring; a graph captured under
inference mode (Lightning's validation) must replay in training; on two GPUs, two ranks over
NCCL that destroy their process group with replayed graphs still held must get past it. Run with
`python -m pytest tests/ops/test_cuda_graphs.py` on the GPU machine; CI has none, so those
cases skip there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from lightning_seqpar.layout import shard_sequence
from lightning_seqpar.ops import _graphs, captured_signatures, clear_cuda_graphs, ring_attention, set_cuda_graphs
from lightning_seqpar.ops._comm import Ring
from lightning_seqpar.ops._common import stack_kv


@pytest.fixture
def graphs_on():
    set_cuda_graphs(True)
    clear_cuda_graphs()
    try:
        yield
    finally:
        set_cuda_graphs(False)
        clear_cuda_graphs()


def ring_calls(graphs: bool, causal: bool) -> tuple[list[list[torch.Tensor]], int]:
    """Three calls of the ring (forward and backward) on fresh inputs, with graphs on or off;
    returns what each gave and how many signatures were captured."""
    set_cuda_graphs(graphs)
    clear_cuda_graphs()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    try:
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            whole = [torch.randn(2, 4, 6 * world, 8, generator=gen) for _ in range(4)]
            q, k, v, dout = (shard_sequence(t, 2, rank, world, "zigzag") for t in whole)
            q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
            out = ring_attention(q, k, v, causal=causal, layout="zigzag")
            out.backward(dout)
            results.append([out.detach(), q.grad, k.grad, v.grad])
        return results, captured_signatures()
    finally:
        set_cuda_graphs(False)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_off_cuda_the_setting_leaves_the_ring_eager(process_pools, world_size, causal):
    pool = process_pools(world_size)
    eager = pool.run_ok(ring_calls, False, causal)
    graphed = pool.run_ok(ring_calls, True, causal)
    for (want, _), (got, captured) in zip(eager, graphed):
        assert captured == 0
        for want_call, got_call in zip(want, got):
            for w, g in zip(want_call, got_call):
                assert torch.equal(w, g)


class FakeCapture:
    """Stands in for `_Captured` on CPU: records captures, and replays by calling the pass."""

    made: list = []

    def __init__(self, fn, tensors, group):
        self.fn, self.group = fn, group
        FakeCapture.made.append(self)

    def __call__(self, tensors):
        return self.fn(*tensors)


def test_signatures_capture_on_the_second_call_and_tell_shapes_options_and_kernel_apart(monkeypatch, graphs_on):
    calls = []

    def fake_pass(x, y, ring, masks, *, causal):
        calls.append((x.shape, causal))
        return (x + y,)

    monkeypatch.setattr(_graphs, "_capturable", lambda tensors, ring: True)
    monkeypatch.setattr(_graphs, "_Captured", FakeCapture)
    FakeCapture.made = []
    run = _graphs.graphed(fake_pass)
    ring = Ring()
    a, b = torch.ones(2, 3), torch.ones(4, 3)
    for _ in range(3):
        assert torch.equal(run(a, a, ring, None, causal=True)[0], a + a)
    assert len(FakeCapture.made) == 1  # eager, then captured once, then replayed
    run(b, b, ring, None, causal=True)  # another shape: eager
    run(a, a, ring, None, causal=False)  # another option: eager
    run(a.t().contiguous().t(), a, ring, None, causal=True)  # other strides: eager
    assert len(FakeCapture.made) == 1
    import lightning_seqpar.ops._kernels as kernels
    monkeypatch.setattr(kernels, "_OVERRIDE", "math")
    run(a, a, ring, None, causal=True)  # another block kernel forced: eager
    run(a, a, ring, None, causal=True)
    assert len(FakeCapture.made) == 2
    assert captured_signatures() == 2
    clear_cuda_graphs()
    assert captured_signatures() == 0
    assert len(calls) == 3 + 3 + 2  # every call reached the pass (the fake replays call it)


def test_key_padding_masks_are_one_more_input_of_their_own_signature(monkeypatch, graphs_on):
    """Masks go into the graph as its last input: a masked call captures apart from an unmasked
    one of the same tensors, and from one with masks of another shape, and each replay gets the
    masks it was called with."""
    seen = []

    def fake_pass(x, ring, masks, *, causal):
        seen.append(None if masks is None else masks.clone())
        return (x if masks is None else x * masks.sum(),)

    monkeypatch.setattr(_graphs, "_capturable", lambda tensors, ring: True)
    monkeypatch.setattr(_graphs, "_Captured", FakeCapture)
    FakeCapture.made = []
    run = _graphs.graphed(fake_pass)
    ring, x = Ring(), torch.ones(2, 3)
    for _ in range(2):
        run(x, ring, None, causal=True)
    assert len(FakeCapture.made) == 1
    for fill in (True, False, True):  # eager, captured, replayed: each with its own masks
        masks = torch.full((1, 2, 3), fill)
        assert torch.equal(run(x, ring, masks, causal=True)[0], x * masks.sum())
        assert torch.equal(seen[-1], masks)
    assert len(FakeCapture.made) == 2
    run(x, ring, torch.ones(1, 2, 4, dtype=torch.bool), causal=True)  # masks of another shape: eager
    assert len(FakeCapture.made) == 2


def test_a_failed_capture_names_the_way_back_to_eager(monkeypatch, graphs_on):
    def broken(*tensors):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_graphs, "_capturable", lambda tensors, ring: True)
    monkeypatch.setattr(_graphs, "_Captured", lambda fn, tensors, group: broken())
    run = _graphs.graphed(lambda x, ring, masks: (x,))
    x = torch.ones(2)
    run(x, Ring(), None)
    with pytest.raises(RuntimeError, match=r"set_cuda_graphs\(False\) or SeqParStrategy\(cuda_graphs=False\)"):
        run(x, Ring(), None)


def test_graph_input_copies_keep_values_and_layouts_and_lay_k_and_v_side_by_side():
    """A graph's input copies: equal to the inputs, in their layouts; consecutive contiguous
    inputs of one shape and dtype (a backward's dout, q, k, v) share one buffer, so the pass
    sends K and V as they lie (`stack_kv`). A transposed input (a model's q) and another dtype
    (the lse) are cloned as they are."""
    gen = torch.Generator().manual_seed(0)
    q_transposed = torch.randn(2, 5, 4, 3, generator=gen).transpose(1, 2)
    dout, k, v, out = (torch.randn(2, 4, 5, 3, generator=gen) for _ in range(4))
    lse = torch.randn(2, 4, 5, generator=gen)
    inputs = [q_transposed, dout, k, v, out.bfloat16(), lse]
    copies = _graphs.input_copies(inputs)
    assert len(copies) == len(inputs)
    for source, copy in zip(inputs, copies):
        assert torch.equal(copy, source) and copy.stride() == source.stride() and copy.dtype == source.dtype
        assert copy.data_ptr() != source.data_ptr()
    k_copy, v_copy = copies[2], copies[3]
    assert stack_kv(k_copy, v_copy).data_ptr() == k_copy.data_ptr()
    assert copies[1].untyped_storage().data_ptr() == k_copy.untyped_storage().data_ptr()
    assert copies[0].untyped_storage().data_ptr() != k_copy.untyped_storage().data_ptr()
    # 5 x 3 bf16 elements are 30 bytes, not a multiple of 16: a second of them would start
    # misaligned, so each is cloned on its own.
    odd = [t[:1, :1].bfloat16() for t in (k, v)]
    odd_copies = _graphs.input_copies(odd)
    assert all(torch.equal(c, t) for c, t in zip(odd_copies, odd))
    assert odd_copies[0].untyped_storage().data_ptr() != odd_copies[1].untyped_storage().data_ptr()


def test_dropping_the_graphs_of_one_group_keeps_the_others():
    class Entry:
        def __init__(self, group):
            self.group = group

    first, second = object(), object()
    _graphs._CACHE.update({"a": Entry(first), "b": Entry(second), "c": Entry(first)})
    try:
        assert _graphs._drop_graphs_of(first) == 2
        assert [entry.group for entry in _graphs._CACHE.values()] == [second]
        _graphs._CACHE["d"] = Entry(None)  # a ring of one rank talks on no group
        assert _graphs._drop_graphs_of(None) == 2  # destroying the world takes every group
        assert not _graphs._CACHE
    finally:
        _graphs._CACHE.clear()


def graphs_on_two_groups_then_each_destroyed() -> list:
    """In each rank of a gloo pool: graphs (the capture stubbed out) on two groups of the same
    ranks, then each group destroyed through `dist.destroy_process_group`; what was left after
    each step."""
    saved = (_graphs._capturable, _graphs._Captured, dist.destroy_process_group, c10d.destroy_process_group)
    _graphs._capturable = lambda tensors, ring: True
    _graphs._Captured = FakeCapture
    set_cuda_graphs(True)
    clear_cuda_graphs()
    try:
        first, second = dist.new_group(), dist.new_group()
        run = _graphs.graphed(lambda x, ring, masks: (2 * x,))
        x = torch.ones(3)
        for group in (first, second):
            for _ in range(2):  # eager, then captured
                assert torch.equal(run(x, Ring(group), None)[0], 2 * x)
        seen = [captured_signatures(), getattr(dist.destroy_process_group, "drops_ring_graphs", False),
                dist.destroy_process_group is c10d.destroy_process_group]
        dist.destroy_process_group(first)
        seen += [captured_signatures(), [entry.group is second for entry in _graphs._CACHE.values()]]
        dist.destroy_process_group(second)
        seen.append(captured_signatures())
        return seen
    finally:
        _graphs._capturable, _graphs._Captured, dist.destroy_process_group, c10d.destroy_process_group = saved
        set_cuda_graphs(False)
        clear_cuda_graphs()


@pytest.mark.parametrize("world_size", [2, 4])
def test_destroying_a_group_first_drops_its_graphs(process_pools, world_size):
    """Destroying an NCCL group under a captured graph hangs (see `_graphs_go_before_their_group`):
    the first capture on a group makes `destroy_process_group` drop that group's graphs, and
    only those, before the group goes."""
    for seen in process_pools(world_size).run_ok(graphs_on_two_groups_then_each_destroyed):
        assert seen == [2, True, True, 1, [True], 0]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the GPU machine)")


# The benchmarks' "peer" transfer: each simulated transfer to the other GPU and back (CuPy issues
# the copies), captured in the graph like NCCL's.
peer_transfer = pytest.param("peer", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("cupy") is None,
    reason='the simulation\'s "peer" transfer needs two GPUs and CuPy'))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("transfer", ["nccl", peer_transfer])
def test_replays_match_sdpa_on_the_whole_sequence(graphs_on, dtype, causal, masked, transfer):
    from benchmarks.simulated_ring import DEFAULT_TRANSFER, check_rank, set_transfer, simulated_rank

    set_transfer(transfer)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    rank, world = 1, 4
    try:
        with simulated_rank(rank, world):
            for seed in range(5):  # padded: the padding's length changes with the seed
                errors = check_rank("ring", rank, world, batch=2, hq=4, hkv=2, local_len=256, dim=64, causal=causal,
                                    layout="zigzag", dtype=dtype, device="cuda", masked=masked, seed=seed, simulated=False)
                assert max(errors.values()) <= tolerance, (seed, errors)
                assert captured_signatures() == (0 if seed == 0 else 2), seed
    finally:
        set_transfer(DEFAULT_TRANSFER)


@needs_cuda
def test_auto_takes_the_replayed_ring_for_short_chunks(graphs_on):
    from benchmarks.simulated_ring import check_rank, set_transfer, simulated_rank
    from lightning_seqpar.ops import set_allgather_below
    from lightning_seqpar.ops.auto_attention import DEFAULT_ALLGATHER_BELOW

    set_transfer("nccl")
    set_allgather_below(1 << 20)  # every length counts as short
    try:
        with simulated_rank(1, 4):
            for seed in range(3):
                errors = check_rank("auto", 1, 4, batch=1, hq=4, hkv=4, local_len=128, dim=64, causal=True,
                                    layout="zigzag", dtype=torch.float32, device="cuda", seed=seed, simulated=False)
                assert max(errors.values()) <= 1e-5, (seed, errors)
            assert captured_signatures() == 2  # the ring's forward and backward, not the all-gather op
    finally:
        set_allgather_below(DEFAULT_ALLGATHER_BELOW)


@needs_cuda
def test_a_graph_captured_under_inference_mode_replays_in_training(graphs_on):
    """Lightning's sanity check and validation run under inference mode: a capture made there
    must replay later in a training step, and again under inference mode."""
    from benchmarks.simulated_ring import check_rank, set_transfer, simulated_rank

    set_transfer("nccl")
    shape = dict(batch=1, hq=4, hkv=2, local_len=128, dim=64, causal=True, layout="zigzag", device="cuda")
    with simulated_rank(1, 4):
        q, k, v = (torch.randn(1, h, 128, 64, device="cuda") for h in (4, 2, 2))
        with torch.inference_mode():
            for _ in range(2):  # eager, then captured
                ring_attention(q, k, v, causal=True, layout="zigzag")
        assert captured_signatures() == 1
        for seed in range(2):
            errors = check_rank("ring", 1, 4, dtype=torch.float32, seed=seed, simulated=False, **shape)
            assert max(errors.values()) <= 1e-5, (seed, errors)
        with torch.inference_mode():
            ring_attention(q, k, v, causal=True, layout="zigzag")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a ring of two ranks over NCCL")
def test_destroying_the_group_after_replays_returns():
    """Two ranks over NCCL replay the ring, then call `destroy_process_group()` with the graphs
    still held (as a script ends, or Lightning's exit handler): each rank must get past it."""
    script = Path(__file__).with_name("two_gpu_destroy.py")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(script)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("destroyed with 2 graphs held") == 2, done.stdout

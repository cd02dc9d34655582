"""`attention="auto"`: the all-gather op below the threshold of tokens per rank, the ring from it
on; every rank takes the same path, and ranks that disagree (different local lengths on either
side of the threshold) still raise the same error on every rank instead of hanging.

Tolerance: relative Frobenius error <= 1e-10 against SDPA on the whole sequence, float64.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist

from lightning_seqpar.layout import unshard_sequence
from lightning_seqpar.ops import ATTENTION_OPS, set_allgather_below, set_cuda_graphs
from lightning_seqpar.ops._graphs import graphs_apply
from tests.ops.test_attention import make_inputs, reference, relative_error, run_shard

auto_module = importlib.import_module("lightning_seqpar.ops.auto_attention")
WORLD_SIZE = 2
LOCAL_LEN = 6  # make_inputs: 2 * world_size * PIECE tokens, PIECE = 3


class _Calls:
    """Which op `auto_attention` called, by name."""

    def __init__(self, monkeypatch):
        self.names = []
        for name in ("allgather_attention", "ring_attention"):
            op = getattr(auto_module, name)
            monkeypatch.setattr(auto_module, name, self._recording(name, op))

    def _recording(self, name, op):
        def call(*args, **kwargs):
            self.names.append(name)
            return op(*args, **kwargs)

        return call


@pytest.fixture
def threshold():
    yield set_allgather_below
    set_allgather_below(auto_module.DEFAULT_ALLGATHER_BELOW)


@pytest.mark.parametrize("below,expected", [(LOCAL_LEN + 1, "allgather_attention"), (LOCAL_LEN, "ring_attention"), (0, "ring_attention")])
def test_auto_picks_by_local_length(monkeypatch, threshold, below, expected):
    threshold(below)
    calls = _Calls(monkeypatch)
    q, k, v, dout, _ = make_inputs(0, 1, 4, 2, torch.float64, masked=False)
    q = q[:, :, :LOCAL_LEN]
    k, v = k[:, :, :LOCAL_LEN], v[:, :, :LOCAL_LEN]
    ATTENTION_OPS["auto"](q, k, v, causal=True)
    assert calls.names == [expected]


@pytest.mark.parametrize("graphs_apply,expected", [(True, "ring_attention"), (False, "allgather_attention")])
def test_below_the_threshold_a_graphed_ring_is_chosen(monkeypatch, threshold, graphs_apply, expected):
    """Where the ring would replay from CUDA graphs (here: said so; on CPU they never apply),
    short chunks take it too: replayed, it was ahead of the all-gather op at every short length."""
    threshold(LOCAL_LEN + 1)
    monkeypatch.setattr(auto_module, "graphs_apply", lambda x, group: graphs_apply)
    calls = _Calls(monkeypatch)
    q, k, v, _, mask = make_inputs(0, 1, 4, 2, torch.float64, masked=True)
    q, k, v, mask = q[:, :, :LOCAL_LEN], k[:, :, :LOCAL_LEN], v[:, :, :LOCAL_LEN], mask[:, :LOCAL_LEN]
    ATTENTION_OPS["auto"](q, k, v, causal=True)
    # A key padding mask changes nothing: masked calls replay too.
    ATTENTION_OPS["auto"](q, k, v, causal=True, key_padding_mask=mask)
    assert calls.names == [expected, expected]


def test_graphs_never_apply_off_cuda(threshold):
    set_cuda_graphs(True)
    try:
        assert not graphs_apply(torch.ones(1, 1, 4, 2), None)
    finally:
        set_cuda_graphs(False)


def test_threshold_rejects_nonsense(threshold):
    for bad in (-1, 1.5, True, "4096"):
        with pytest.raises(ValueError, match="tokens per rank"):
            threshold(bad)


def auto_shard(below, *args):
    set_allgather_below(below)
    try:
        return run_shard("auto", *args)
    finally:
        set_allgather_below(auto_module.DEFAULT_ALLGATHER_BELOW)


@pytest.mark.parametrize("below", [LOCAL_LEN + 1, LOCAL_LEN], ids=["allgather", "ring"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_auto_matches_single_process_sdpa(process_pools, below, layout):
    seed, heads, masked, causal = 7, (4, 2), True, True
    results = process_pools(WORLD_SIZE).run_ok(auto_shard, below, seed, *heads, torch.float64, masked, causal, layout)
    q, k, v, dout, mask = make_inputs(seed, WORLD_SIZE, *heads, torch.float64, masked)
    expected = reference(q, k, v, dout, mask, causal)
    for name, i in zip(["out", "dq", "dk", "dv"], range(4)):
        err = relative_error(unshard_sequence([r[i] for r in results], 2, layout), expected[i])
        assert err <= 1e-10, f"{name}: relative error {err:.2e}"


def lengths_across_the_threshold():
    """Rank 0 holds 4 tokens (all-gather op), rank 1 holds 6 (ring): the same error on both."""
    set_allgather_below(5)
    try:
        length = 4 if dist.get_rank() == 0 else 6
        q, k, v = (torch.randn(2, 4, length, 8, dtype=torch.float64) for _ in range(3))
        ATTENTION_OPS["auto"](q, k, v, causal=True)
    finally:
        set_allgather_below(auto_module.DEFAULT_ALLGATHER_BELOW)


def test_ranks_on_either_side_of_the_threshold_raise_on_every_rank(process_pools):
    outcomes = process_pools(WORLD_SIZE).run(lengths_across_the_threshold, timeout=60)
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", f"rank {outcome.rank}: {outcome.error_type} {outcome.error}"
        assert "same batch, heads, head dim, dtype, mask presence and local length" in outcome.error
    assert process_pools(WORLD_SIZE).run_ok(dist.get_rank) == [0, 1]


def test_environment_sets_the_threshold_or_names_itself(monkeypatch):
    monkeypatch.setenv(auto_module.ENV, "1024")
    assert auto_module._from_environment() == 1024
    monkeypatch.delenv(auto_module.ENV)
    assert auto_module._from_environment() == auto_module.DEFAULT_ALLGATHER_BELOW
    for bad in ("-5", "2k", ""):
        monkeypatch.setenv(auto_module.ENV, bad)
        with pytest.raises(ValueError, match="LIGHTNING_SEQPAR_ALLGATHER_BELOW takes a number of tokens per rank"):
            auto_module._from_environment()

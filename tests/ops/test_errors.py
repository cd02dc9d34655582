"""Bad inputs raise the same clear ValueError on every rank of the group, never a hang (the
pool's task timeout and the gloo collective timeout bound every case)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_seqpar.ops import (
    ATTENTION_OPS,
    backward_blocks_per_call,
    set_allgather_below,
    set_backward_blocks_per_call,
    set_block_kernel,
)
from lightning_seqpar.ops._kernels import block_kernel_override
from lightning_seqpar.ops.auto_attention import allgather_below

WORLD_SIZE = 2


def call_with_problem(algo, problem):
    """Every rank calls the op; only rank 1 has the problem (except where all ranks must)."""
    rank = dist.get_rank()
    shape = dict(b=2, hq=4, hkv=2, length=4, d=8)
    dtype, kv_device, mask, kwargs = torch.float32, "cpu", None, {}
    if rank == 1:
        if problem == "local_length":
            shape["length"] = 6
        elif problem == "heads":
            shape["hkv"] = 3
        elif problem == "dtype":
            dtype = torch.float64
        elif problem == "device":
            kv_device = "meta"
        elif problem == "mask_shape":
            mask = torch.ones(2, 5, dtype=torch.bool)
    if problem == "zigzag_odd":
        shape["length"] = 3
        kwargs["layout"] = "zigzag"
    if problem == "dropout":
        kwargs["dropout_p"] = 0.1
    if problem == "layout":
        kwargs["layout"] = "stripes"
    q = torch.randn(shape["b"], shape["hq"], shape["length"], shape["d"])
    k = torch.randn(shape["b"], shape["hkv"], shape["length"], shape["d"], dtype=dtype, device=kv_device)
    v = torch.randn(shape["b"], shape["hkv"], shape["length"], shape["d"], dtype=dtype, device=kv_device)
    ATTENTION_OPS[algo](q, k, v, key_padding_mask=mask, **kwargs)


PROBLEMS = {
    "local_length": "same batch, heads, head dim, dtype, mask presence and local length",
    "heads": "rank 1: the number of query heads must be a multiple of the number of key/value heads",
    "dtype": "rank 1: q, k and v must share one dtype",
    "device": "rank 1: q, k and v must be on one device",
    "mask_shape": "rank 1: key_padding_mask must be a bool tensor [B, L_local]",
    "zigzag_odd": "the local length must be even for the 'zigzag' layout",
    "dropout": "set dropout_p=0.0",
    "layout": "unknown layout 'stripes'",
}


def call_with_a_setting_of_its_own(algo, setting):
    """Every rank calls the op with good inputs; rank 1 alone has changed a process-wide setting
    that decides what the ops send."""
    settings = {
        "set_backward_blocks_per_call": (backward_blocks_per_call, set_backward_blocks_per_call, 3),
        "set_allgather_below": (allgather_below, set_allgather_below, 1),
        "set_block_kernel": (block_kernel_override, set_block_kernel, "math"),
    }
    read, write, other = settings[setting]
    saved = read()
    if dist.get_rank() == 1:
        write(other)
    try:
        q, k, v = (torch.randn(2, 4, 4, 8) for _ in range(3))
        ATTENTION_OPS[algo](q, k, v, causal=True)
    finally:
        write(saved)


@pytest.mark.parametrize("algo", ["ring", "auto"])
@pytest.mark.parametrize("setting", ["set_backward_blocks_per_call", "set_allgather_below", "set_block_kernel"])
def test_settings_that_differ_across_ranks_raise_on_every_rank(process_pools, algo, setting):
    outcomes = process_pools(WORLD_SIZE).run(call_with_a_setting_of_its_own, algo, setting, timeout=60)
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", f"rank {outcome.rank}: {outcome.error_type} {outcome.error}"
        assert "same settings on every rank" in outcome.error and f"{setting}: rank 0 " in outcome.error, outcome.error
    assert process_pools(WORLD_SIZE).run_ok(dist.get_rank) == [0, 1]


@pytest.mark.parametrize("algo", ["ring", "rsa", "allgather"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_error_on_every_rank(process_pools, algo, problem):
    outcomes = process_pools(WORLD_SIZE).run(call_with_problem, algo, problem, timeout=60)
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", f"rank {outcome.rank}: {outcome.error_type} {outcome.error}"
        assert PROBLEMS[problem] in outcome.error, outcome.error
    # The group is still usable afterwards: nothing was left half-sent.
    assert process_pools(WORLD_SIZE).run_ok(dist.get_rank) == [0, 1]

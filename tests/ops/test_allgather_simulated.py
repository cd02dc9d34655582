"""The simulation of one rank of a 4-rank group (`benchmarks/simulated_ring.py`: fake process
group, every rank's K/V chunk equal to this rank's) runs the all-gather op, whose all-gather and
reduce-scatter it replaces, and still runs the ring. Benchmarks time and measure the ops through
it, so each simulated rank's output and gradients must match SDPA on the global sequence it
stands for: relative error <= 1e-10 in float64, every rank, causal and full, both layouts, with
and without a key padding mask, grouped-query heads."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks import simulated_ring
from benchmarks.simulated_ring import allgather_module, check_rank, every_rank_holds_mine
from lightning_seqpar.ops import _comm, _common

WORLD_SIZE = 4
CASES = list(itertools.product([False, True], ["contiguous", "zigzag"], [False, True]))


@pytest.mark.parametrize("algo", ["allgather", "ring"])
@pytest.mark.parametrize(
    "causal,layout,masked", CASES, ids=[f"{'causal' if c else 'full'}-{lay}-{'mask' if m else 'nomask'}" for c, lay, m in CASES]
)
def test_simulated_rank_matches_sdpa(algo, causal, layout, masked):
    for rank in range(WORLD_SIZE):
        errors = check_rank(
            algo, rank, WORLD_SIZE, batch=2, hq=4, hkv=2, local_len=12, dim=8, causal=causal, layout=layout,
            dtype=torch.float64, device="cpu", masked=masked, seed=rank,
        )
        assert max(errors.values()) <= 1e-10, f"rank {rank}: {errors}"


def test_simulation_restores_the_collectives():
    def current():
        return (_comm.Ring.exchange, _comm.Ring.fetch, _comm.Ring.send_home, _comm.Ring.visitor, _common.all_gather_rows,
                allgather_module.all_gather_kv, allgather_module.reduce_scatter_grads)

    originals = current()
    with every_rank_holds_mine():
        assert all(patched is not original for patched, original in zip(current(), originals))
    assert current() == originals


def test_simulated_transfer_modes():
    """The benchmarks' transfer choice and NCCL stream priority: a wrong name is refused with
    the choices; every mode at every priority hands back an equal copy (on CPU each is a
    clone), not the tensor that was sent."""
    with pytest.raises(ValueError, match="memcpy"):
        simulated_ring.set_transfer("rdma")
    with pytest.raises(ValueError, match="normal"):
        simulated_ring.set_transfer("nccl", "urgent")
    sent = torch.randn(2, 3, 4)
    try:
        for mode in simulated_ring.TRANSFERS:
            for priority in simulated_ring.COMM_PRIORITIES:
                simulated_ring.set_transfer(mode, priority)
                received, pending = simulated_ring._simulated_transfer(sent)
                assert received is not sent and torch.equal(received, sent) and pending == []
    finally:
        simulated_ring.set_transfer(simulated_ring.DEFAULT_TRANSFER)

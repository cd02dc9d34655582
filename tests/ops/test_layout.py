"""Sequence layouts: the pieces each rank holds, their round trip, and their positions."""

from __future__ import annotations

import pytest
import torch

from lightning_seqpar.layout import sequence_positions, shard_sequence, unshard_sequence
from lightning_seqpar.ops._pieces import causal_step_tasks


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_round_trip_and_positions(layout, world_size):
    seq_len = 2 * world_size * 5
    x = torch.arange(seq_len).repeat(3, 1)  # [3, L]: the value of each token is its position
    chunks = [shard_sequence(x, 1, r, world_size, layout) for r in range(world_size)]
    assert torch.equal(unshard_sequence(chunks, 1, layout), x)
    for rank, chunk in enumerate(chunks):
        assert torch.equal(chunk[0], sequence_positions(seq_len, rank, world_size, layout))


def test_zigzag_pieces():
    x = torch.arange(16)
    # 8 pieces of 2 tokens; rank r holds pieces r and 7 - r.
    assert shard_sequence(x, 0, 0, 4, "zigzag").tolist() == [0, 1, 14, 15]
    assert shard_sequence(x, 0, 3, 4, "zigzag").tolist() == [6, 7, 8, 9]


@pytest.mark.parametrize("layout,multiple,padded", [("contiguous", 4, 12), ("zigzag", 8, 16)])
def test_unsplittable_length_names_the_multiple(layout, multiple, padded):
    with pytest.raises(ValueError, match=f"must be a multiple of {multiple}; pad it to {padded}"):
        shard_sequence(torch.zeros(2, 10), 1, 0, 4, layout)
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        sequence_positions(10, 0, 4, layout)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'stripe'"):
        shard_sequence(torch.zeros(8), 0, 0, 2, "stripe")


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(world_size):
    """Every rank computes the same number of (query, key) block cells under zigzag; under a
    contiguous cut the last rank does the most."""

    def work(layout, rank):
        local = 2 * 6
        return sum(
            (t.q.stop - t.q.start) * (t.k.stop - t.k.start) // (2 if t.causal else 1)
            for owner in range(world_size)
            for t in causal_step_tasks(rank, owner, world_size, local, layout, causal=True)
        )

    zigzag = [work("zigzag", r) for r in range(world_size)]
    contiguous = [work("contiguous", r) for r in range(world_size)]
    assert len(set(zigzag)) == 1
    assert contiguous == sorted(contiguous) and contiguous[-1] > contiguous[0]


def test_causal_steps_that_see_nothing_are_skipped():
    assert causal_step_tasks(0, 1, 2, 8, "contiguous", causal=True) == []
    assert len(causal_step_tasks(1, 0, 2, 8, "contiguous", causal=True)) == 1

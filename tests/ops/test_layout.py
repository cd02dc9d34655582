"""Sequence layouts: the pieces each rank holds, their round trip, and their positions."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_seqpar.layout import sequence_positions, shard_sequence, unshard_sequence
from lightning_seqpar.ops._comm import step_groups
from lightning_seqpar.ops._pieces import buffer_piece_orders, causal_step_tasks, visit_plan


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


def cells_of_tasks(rank, steps, world_size, local, layout, causal):
    """(query row, visit block, key row of its owner, causal) of every cell the steps' tasks
    compute."""
    return {(qr, b, kr, t.causal)
            for b, step in enumerate(steps)
            for t in causal_step_tasks(rank, (rank - step) % world_size, world_size, local, layout, causal)
            for qr in range(t.q.start, t.q.stop) for kr in range(t.k.start, t.k.stop)}


def cells_of_calls(calls):
    cells = set()
    for call in calls:
        # The segments tile the call's key rows in order, each as long as the rows it stands for.
        assert call.segments[0].buffer.start == call.k.start and call.segments[-1].buffer.stop == call.k.stop
        for seg, nxt in zip(call.segments, call.segments[1:]):
            assert seg.buffer.stop == nxt.buffer.start
        for seg in call.segments:
            assert seg.buffer.stop - seg.buffer.start == seg.local.stop - seg.local.start
            cells |= {(qr, seg.block, kr, call.causal) for qr in range(call.q.start, call.q.stop)
                      for kr in range(seg.local.start, seg.local.stop)}
    return cells


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True), ("zigzag", False)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_visit_plans_compute_exactly_the_cells_of_the_step_tasks(world_size, layout, causal, blocks):
    local = 12
    for rank in range(world_size):
        for steps in step_groups(world_size, blocks):
            order, calls = visit_plan(rank, steps, world_size, local, layout, causal)
            assert order in buffer_piece_orders(len(steps), layout)
            assert cells_of_calls(calls) == cells_of_tasks(rank, steps, world_size, local, layout, causal)
            # No two calls read the same buffer rows for the same query rows.
            for a, b in itertools.combinations(calls, 2):
                assert a.q != b.q or a.k.stop <= b.k.start or b.k.stop <= a.k.start


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_a_pair_of_blocks_is_one_call_wherever_their_query_rows_agree(world_size):
    """Under zigzag a rank reads the first piece of every block owned before it and all of
    every block owned after it, with other query rows: a pair of one kind is one call over
    both, a pair of both kinds two calls; a contiguous cut's pairs are one call each. Either
    way each block's rows are one segment: one partial per block to send home."""
    for rank in range(world_size):
        for steps in step_groups(world_size, 2)[1:]:
            owners = [(rank - s) % world_size for s in steps]
            kinds = {owner < rank for owner in owners}
            _, calls = visit_plan(rank, steps, world_size, 8, "zigzag", True)
            assert len(calls) == len(kinds)
            assert sum(len(call.segments) for call in calls) == len(steps)
            _, calls = visit_plan(rank, steps, world_size, 8, "contiguous", False)
            assert len(calls) == 1 and len(calls[0].segments) == len(steps)


def test_buffer_piece_orders_are_block_by_block_or_first_pieces_first():
    assert buffer_piece_orders(2, "zigzag") == (((0, 0), (0, 1), (1, 0), (1, 1)), ((0, 0), (1, 0), (1, 1), (0, 1)))
    assert buffer_piece_orders(1, "zigzag") == (((0, 0), (0, 1)),)
    assert buffer_piece_orders(3, "contiguous") == (((0, 0), (1, 0), (2, 0)),)

"""A key padding mask passed beside `is_causal=True` (what torch >= 2.5 accepts, and what the
reference GPT does with padded batches) runs through the ring as causal + padding, equal to
SDPA on the whole sequence in one process (relative error <= 1e-10, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seqpar.layout import shard_sequence, unshard_sequence
from lightning_seqpar.swap import RingContext
from lightning_seqpar.swap.context import ring_context
from lightning_seqpar.swap.sdpa import sdpa_through_ring

LAYOUT = "zigzag"


def inputs(world_size):
    gen = torch.Generator().manual_seed(11)
    seq_len = 4 * world_size * 3
    q, k, v, dout = (torch.randn(2, 4, seq_len, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(2, seq_len, dtype=torch.bool)
    mask[0, seq_len // 2 :] = False  # right padding: later chunks hold no real key
    return q, k, v, dout, mask


def ring_shard():
    rank, world_size = dist.get_rank(), dist.get_world_size()
    q, k, v, dout, mask = inputs(world_size)
    local = [shard_sequence(t, 2, rank, world_size, LAYOUT).clone().requires_grad_() for t in (q, k, v)]
    local_mask = shard_sequence(mask, 1, rank, world_size, LAYOUT)
    with ring_context(RingContext(group=None, algorithm="ring", layout=LAYOUT)):
        out = sdpa_through_ring(*local, attn_mask=local_mask[:, None, None, :], is_causal=True)
    out.backward(shard_sequence(dout, 2, rank, world_size, LAYOUT))
    return [out.detach()] + [t.grad for t in local]


@pytest.mark.parametrize("world_size", [2, 4])
def test_padding_mask_beside_is_causal(process_pools, world_size):
    results = process_pools(world_size).run_ok(ring_shard)
    q, k, v, dout, mask = inputs(world_size)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    length = q.size(2)
    allowed = mask[:, None, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    ref.backward(dout)
    for i, expected in enumerate([ref.detach(), q.grad, k.grad, v.grad]):
        got = unshard_sequence([r[i] for r in results], 2, LAYOUT)
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-10

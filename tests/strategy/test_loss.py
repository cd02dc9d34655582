"""`cross_entropy` over chunks on 4 ranks equals `F.cross_entropy` (token mean) on one device.

Each rank holds a chunk of a global batch with unequal valid-token counts (one rank none at
all). The value must equal the one-device loss on every rank; the gradient of a replicated
parameter, averaged over ranks as DDP does, must equal the one-device gradient. Tolerance:
relative error <= 1e-10 in float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seqpar import cross_entropy

VOCAB, DIM, PER_RANK = 5, 3, 6


def global_inputs(world: int, valid_per_rank: list[int]):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(world, PER_RANK, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (world, PER_RANK), generator=gen)
    for rank, valid in enumerate(valid_per_rank):
        labels[rank, valid:] = -100
    weight = torch.randn(DIM, VOCAB, generator=gen, dtype=torch.float64)
    return x, labels, weight


def loss_and_grad_on_rank(valid_per_rank):
    rank, world = dist.get_rank(), dist.get_world_size()
    x, labels, weight = global_inputs(world, valid_per_rank)
    weight = weight.clone().requires_grad_()
    loss = cross_entropy(x[rank] @ weight, labels[rank])
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    return loss.item(), grad / world  # DDP's average over the world


def one_device(valid_per_rank, world):
    x, labels, weight = global_inputs(world, valid_per_rank)
    weight = weight.clone().requires_grad_()
    loss = F.cross_entropy((x @ weight).reshape(-1, VOCAB), labels.reshape(-1))
    loss.backward()
    return loss.item(), weight.grad


def test_value_and_gradient_equal_one_device_with_unequal_and_empty_chunks(process_pools):
    valid = [6, 1, 0, 4]
    results = process_pools(4).run_ok(loss_and_grad_on_rank, valid)
    expected_loss, expected_grad = one_device(valid, 4)
    for loss, grad in results:
        assert abs(loss - expected_loss) <= 1e-10 * abs(expected_loss)
        assert ((grad - expected_grad).norm() / expected_grad.norm()).item() <= 1e-10


def test_no_valid_token_anywhere_gives_zero_not_nan(process_pools):
    for loss, grad in process_pools(4).run_ok(loss_and_grad_on_rank, [0, 0, 0, 0]):
        assert loss == 0.0 and bool((grad == 0).all())


def test_single_process_is_plain_token_mean():
    x, labels, weight = global_inputs(1, [4])
    assert torch.allclose(cross_entropy(x[0] @ weight, labels[0]), F.cross_entropy(x[0] @ weight, labels[0]))

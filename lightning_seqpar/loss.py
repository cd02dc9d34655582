"""Losses over a sequence cut across ranks that train exactly like one device.

Each rank holds one chunk of each sequence, so a loss averaged over the local chunk is the wrong
quantity twice over: its value differs from rank to rank, and its gradient weights a token by
1 / (valid tokens of its chunk) instead of 1 / (valid tokens of the whole global batch). Chunks
hold unequal numbers of valid tokens whenever padding or ignored labels sit at the end, and a
chunk with none gives NaN.

`token_mean` fixes both for any per-token loss. With W ranks in the world (DDP averages
gradients over all of them), rank r's local loss sum s_r and N valid tokens over the world:

- the value returned is the global token mean  sum_r s_r / N  (identical on every rank);
- the gradient that flows back is that of  s_r * W / N,  so after DDP divides the summed
  gradients by W the result is  sum_r grad(s_r) / N:  the single-device token-mean gradient of
  the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seqpar.ops._comm import collective_device

__all__ = ["cross_entropy", "token_mean"]


def _world(group) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1



def token_mean(local_sum: torch.Tensor, local_count: torch.Tensor | int, group=None) -> torch.Tensor:
    """Global token mean of a per-token loss whose local sum and count are given.

    `local_sum`: this rank's loss summed over its valid tokens (a differentiable scalar).
    `local_count`: how many valid tokens that sum covers. `group`: the ranks whose gradients
    DDP averages (default: the world, which is what `SeqParStrategy` uses).

    Returns a scalar whose value is sum(local_sum) / sum(local_count) over the group, the same on
    every rank, and whose gradient after DDP's average over the group is the single-device
    token-mean gradient. When no rank holds a valid token the value and gradient are 0 (one
    device would give NaN). Every rank of the group must call it: it all-reduces two numbers.
    """
    world = _world(group)
    count = torch.as_tensor(local_count, dtype=torch.float64, device=local_sum.device)
    if world == 1:
        return local_sum / count.clamp(min=1).to(local_sum.dtype)
    totals = torch.stack([local_sum.detach().to(torch.float64), count])
    device = collective_device(group)
    totals_comm = totals.to(device)
    dist.all_reduce(totals_comm, group=group)
    global_sum, global_count = totals_comm.to(local_sum.device).unbind()
    global_count = global_count.clamp(min=1)
    scaled = local_sum * (world / global_count).to(local_sum.dtype)
    # The value is replaced by the global mean; the gradient stays that of `scaled`.
    value = (global_sum / global_count).to(local_sum.dtype)
    return scaled + (value - scaled.detach())


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
    group=None,
) -> torch.Tensor:
    """Token-mean cross entropy of the local chunk, equal to one device on the global batch.

    logits: `[..., V]` (e.g. `[B, L_local, V]`), labels: `[...]` (e.g. `[B, L_local]`), already
    aligned with the tokens (shift labels on the full sequence, before the batch is cut).
    Labels equal to `ignore_index` don't count. Half-precision logits are upcast to float32.
    The value is the token mean over the whole global batch (identical on every rank, so
    `self.log(..., sync_dist=True)` and checkpoint monitors see the single-device number); the
    gradient, after DDP's averaging, is single-device token-mean cross entropy. See `token_mean`.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy expects logits [..., V] and labels [...] with matching leading dims, "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_labels = labels.reshape(-1)
    local_sum = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    local_count = (flat_labels != ignore_index).sum()
    return token_mean(local_sum, local_count, group=group)

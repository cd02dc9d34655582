"""Models for the reliability tests, built on the strategy tests' tiny LM and data. Nothing here
knows about sequence parallelism except the loss switch (`reference=True`: plain
`F.cross_entropy` on one process)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tests.strategy.models import DIM, HEADS, VOCAB, TinyCausalLM, TrainedModule, lm_samples


class BidirectionalAttention(nn.Module):
    """Full (non-causal) attention without any mask: every key counts, so a padded key that the
    ring did not mask would change every output."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, length, DIM))


class TinyBidirectional(TrainedModule):
    """Embedding + learned positions (from `position_ids`) + 2 unmasked attention layers."""

    def __init__(self, checkpointing: bool = False, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(64, DIM)
        self.attns = nn.ModuleList([BidirectionalAttention() for _ in range(2)])
        self.head = nn.Linear(DIM, VOCAB)
        self.checkpointing = checkpointing

    def logits_and_labels(self, batch):
        ids = batch["input_ids"]
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
        x = self.embed(ids) + self.pos(positions)
        for attn in self.attns:
            if self.checkpointing:
                x = x + torch.utils.checkpoint.checkpoint(attn, x, use_reentrant=False)
            else:
                x = x + self.drop(attn(x))
        return self.head(x), batch["labels"]


def build_bidirectional(reference: bool, batch_size: int, n_train: int, seq_len: int, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    data = dict(train=lm_samples(n_train, seed, seq_len), val=lm_samples(4, seed + 100, seq_len))
    return TinyBidirectional(reference=reference, batch_size=batch_size, **data, **kwargs)


class RankSeededAugmentation(TinyCausalLM):
    """Replaces random tokens with a generator seeded by the *global* rank: the classic bug that
    gives the SP ranks of one group different versions of the same sample."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        gen = torch.Generator().manual_seed(1000 + self.global_rank)
        ids = batch["input_ids"].clone()
        drop = torch.rand(ids.shape, generator=gen) < 0.2
        ids[drop] = 1
        return dict(batch, input_ids=ids)


class GlobalRankSampler(TinyCausalLM):
    """Builds its own DistributedSampler over the world instead of the dp ranks."""

    def train_dataloader(self):
        sampler = DistributedSampler(self.train_data, num_replicas=self.trainer.world_size, rank=self.global_rank)
        return DataLoader(self.train_data, batch_size=self.batch_size, sampler=sampler)

"""Small models and data for the strategy tests. Nothing here knows about sequence parallelism
except the loss switch: `reference=True` uses plain `F.cross_entropy` (one device, the
baseline), otherwise `lightning_seqpar.cross_entropy`."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.text import Perplexity

import lightning_seqpar

VOCAB, DIM, HEADS, KV_HEADS, SEQ_LEN = 32, 32, 4, 2, 16
IGNORE = -100


# ----- data ------------------------------------------------------------------------------------

def valid_lengths(n: int, seed: int) -> list[int]:
    """Lengths that leave chunks of unequal valid-token counts, some with none at all."""
    gen = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(2, SEQ_LEN + 1, (n,), generator=gen)]


def lm_samples(n: int, seed: int, seq_len: int = SEQ_LEN) -> list[dict]:
    """Padded sequences, odd ones left-padded; labels shifted on the whole sequence."""
    gen = torch.Generator().manual_seed(seed + 1)
    samples = []
    for i, length in enumerate(valid_lengths(n, seed)):
        length = min(length, seq_len)
        tokens = torch.randint(1, VOCAB, (length,), generator=gen)
        ids = torch.zeros(seq_len, dtype=torch.long)
        labels = torch.full((seq_len,), IGNORE, dtype=torch.long)
        mask = torch.zeros(seq_len, dtype=torch.bool)
        start = seq_len - length if i % 2 else 0
        ids[start : start + length] = tokens
        labels[start : start + length - 1] = tokens[1:]
        mask[start : start + length] = True
        samples.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return samples


def encoder_samples(n: int, seed: int) -> list[tuple]:
    """(tokens, positions, labels, padding) with right padding; labels depend on context."""
    gen = torch.Generator().manual_seed(seed + 2)
    samples = []
    for length in valid_lengths(n, seed):
        tokens = torch.zeros(SEQ_LEN, dtype=torch.long)
        tokens[:length] = torch.randint(1, VOCAB, (length,), generator=gen)
        labels = torch.full((SEQ_LEN,), IGNORE, dtype=torch.long)
        labels[:length] = (tokens[:length] + tokens[:length].flip(0)) % 7
        padding = torch.arange(SEQ_LEN) >= length
        samples.append((tokens, torch.arange(SEQ_LEN), labels, padding))
    return samples


# ----- modules ---------------------------------------------------------------------------------

def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE: x `[B, H, L, D]`, positions `[B, L]` (global)."""
    half = x.size(-1) // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32, device=x.device) / half))
    angles = positions[:, None, :, None].to(torch.float32) * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Grouped-query attention with RoPE; calls SDPA either with is_causal=True or with a dense
    causal-and-padding mask built over the sequence it is given.

    No key bias, here or in the encoder: softmax is shift-invariant, so a key bias has an exactly
    zero gradient and AdamW turns the rounding noise of *any* two implementations into lr-sized
    steps; its parameters can't be compared. The ring path with biases is checked output and
    gradient in test_swap.py instead."""

    def __init__(self, mask_style: str):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * self.head_dim, bias=False)
        self.out = nn.Linear(DIM, DIM)
        self.mask_style = mask_style

    def forward(self, x, positions, attention_mask):
        b, length, _ = x.shape
        q = self.q(x).view(b, length, HEADS, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, KV_HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, positions), rotate(k, positions)
        if self.mask_style == "is_causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.mask_style == "window":  # sliding window of 3: no ring can apply it
            near = torch.ones(length, length, dtype=torch.bool, device=x.device).tril().triu(-2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=near, enable_gqa=True)
        else:
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, length, DIM))


class Block(nn.Module):
    def __init__(self, mask_style: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = CausalSelfAttention(mask_style)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, positions, attention_mask):
        x = x + self.attn(self.norm1(x), positions, attention_mask)
        return x + self.mlp(self.norm2(x))


class TrainedModule(L.LightningModule):
    """Shared training loop: records every loss it computes, so tests can compare them."""

    def __init__(self, reference: bool, batch_size: int, train, val, lr: float = 1e-2):
        super().__init__()
        self.reference, self.batch_size, self.lr = reference, batch_size, lr
        self.train_data, self.val_data = train, val
        self.train_losses: list[float] = []
        self.val_losses: list[float] = []

    def loss(self, logits, labels):
        if self.reference:
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)
        return lightning_seqpar.cross_entropy(logits, labels, ignore_index=IGNORE)

    def training_step(self, batch, batch_idx):
        logits, labels = self.logits_and_labels(batch)
        loss = self.loss(logits, labels)
        self.train_losses.append(loss.item())
        self.log("train_loss", loss, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits, labels = self.logits_and_labels(batch)
        loss = self.loss(logits, labels)
        self.val_losses.append(loss.item())
        self.log("val_loss", loss, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self.logits_and_labels(batch)[0]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)

    def train_dataloader(self):
        if self.reference:
            # Lightning shuffles training data under any distributed strategy with
            # DistributedSampler(shuffle=True, seed=0); its permutation doesn't depend on the
            # number of replicas, and the dp ranks' step-i batches together are this one's.
            sampler = DistributedSampler(self.train_data, num_replicas=1, rank=0, shuffle=True)
            return DataLoader(self.train_data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(self.train_data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val_data, batch_size=self.batch_size)


class TinyCausalLM(TrainedModule):
    def __init__(self, mask_style: str = "dense", **kwargs):
        super().__init__(**kwargs)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(mask_style) for _ in range(2)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.val_ppl = Perplexity(ignore_index=IGNORE)

    def forward(self, input_ids, position_ids, attention_mask):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, position_ids, attention_mask)
        return self.head(self.norm(x))

    def logits_and_labels(self, batch):
        ids = batch["input_ids"]
        positions = batch.get("position_ids")
        if positions is None:  # one device: the whole sequence
            positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
        return self(ids, positions, batch["attention_mask"]), batch["labels"]

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        logits, labels = self.logits_and_labels(batch)
        self.val_ppl.update(logits, labels)
        self.log("val_ppl", self.val_ppl)


class TinyEncoder(TrainedModule):
    """nn.TransformerEncoderLayer (batch_first) followed by a bare nn.MultiheadAttention in
    [L, B, E] layout; learned positions from the batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(SEQ_LEN, DIM)
        self.layer = nn.TransformerEncoderLayer(DIM, HEADS, dim_feedforward=2 * DIM, dropout=0.0, batch_first=True, bias=False)
        self.mix = nn.MultiheadAttention(DIM, HEADS, batch_first=False, bias=False)
        self.head = nn.Linear(DIM, 7)

    def logits_and_labels(self, batch):
        tokens, positions, labels, padding = batch
        x = self.layer(self.embed(tokens) + self.pos(positions), src_key_padding_mask=padding)
        seq_first = x.transpose(0, 1)
        mixed, _ = self.mix(seq_first, seq_first, seq_first, key_padding_mask=padding, need_weights=False)
        return self.head(x + mixed.transpose(0, 1)), labels


class NoAttention(TrainedModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def logits_and_labels(self, batch):
        return self.head(self.embed(batch["input_ids"])), batch["labels"]


class IteratorStep(TinyCausalLM):
    def training_step(self, dataloader_iter):
        return super().training_step(next(dataloader_iter), 0)


def build(
    kind: str, reference: bool, batch_size: int, n_train: int, n_val: int,
    mask_style: str = "dense", seed: int = 0, seq_len: int = SEQ_LEN,
):
    torch.manual_seed(seed)
    if kind in ("lm", "iterator_step"):
        data = dict(train=lm_samples(n_train, seed, seq_len), val=lm_samples(n_val, seed + 100, seq_len))
        if kind == "iterator_step":
            return IteratorStep(mask_style=mask_style, reference=reference, batch_size=batch_size, **data)
        return TinyCausalLM(mask_style=mask_style, reference=reference, batch_size=batch_size, **data)
    if kind == "encoder":
        data = dict(train=encoder_samples(n_train, seed), val=encoder_samples(n_val, seed + 100))
        return TinyEncoder(reference=reference, batch_size=batch_size, **data)
    if kind == "none":
        data = dict(train=lm_samples(n_train, seed), val=lm_samples(n_val, seed + 100))
        return NoAttention(reference=reference, batch_size=batch_size, **data)
    raise ValueError(kind)

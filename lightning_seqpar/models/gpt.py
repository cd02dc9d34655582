"""A plain Llama-style causal language model (nanoGPT-sized, nothing hidden).

RMSNorm, rotary position embeddings driven by explicit `position_ids`, SwiGLU MLP and grouped-
query attention computed by `F.scaled_dot_product_attention`. The model contains no
sequence-parallel code: under `SeqParStrategy` each rank receives its chunk of `input_ids` and
the *global* positions of those tokens in `position_ids` (zigzag reorders tokens, so positions
can't be recomputed from the local length), and the strategy redirects the SDPA call to ring
attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (plain multi-head); fewer = grouped-query
    d_model: int = 128
    mlp_hidden: int | None = None  # None = the Llama rule: ~8/3 d_model, rounded up to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head {self.n_head} must be divisible by n_kv_head {self.n_kv_head}")
        if (self.d_model // self.n_head) % 2 != 0:
            raise ValueError("the head dimension must be even for rotary embeddings")
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations don't lose the small variances.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin `[B, 1, L, head_dim]` for the given global positions `[B, L]`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[B, H, L, D]` by position (the half-split convention of Llama / GPT-NeoX)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, key_padding_mask=None):
        """x `[B, L, d_model]`; key_padding_mask `[B, L]` bool, True = real token."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # A key padding mask travels as `[B, 1, 1, L]` next to is_causal=True: the form a
        # sequence-parallel attention can split by keys (a dense `[L, L]` mask can't be).
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, key_padding_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, key_padding_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance
        # independent of depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(param, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        """input_ids `[B, L]` -> logits `[B, L, vocab]`.

        position_ids `[B, L]` (or `[L]`): the global position of every token; default
        `arange(L)`, right only when the model holds the whole sequence in order.
        attention_mask `[B, L]`: 1/True for real tokens, 0/False for padding keys.
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(input_ids.size(0), -1)
        x = self.embed(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, attention_mask)
        return self.lm_head(self.norm(x))

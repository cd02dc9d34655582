"""The reference model: plain PyTorch, equal to a written-out single-device computation."""

import ast
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_seqpar.models import GPT, GPTConfig, CausalLMModule
from lightning_seqpar.models import gpt as gpt_module


def small(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, n_layer=2, n_head=4, d_model=32)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def reference_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The same network written out: rotation by complex numbers, explicit softmax attention,
    K/V heads repeated for grouped-query attention."""
    cfg = model.cfg
    length, half = ids.size(1), cfg.head_dim // 2
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(half).float() / half)
    rot = torch.polar(torch.ones(length, half), torch.arange(length).float()[:, None] * freqs)

    def rope(t):  # [B, H, L, D], halves as (real, imaginary)
        z = torch.complex(t[..., :half], t[..., half:]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    def rms(x, norm):
        return x / (x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt() * norm.weight

    x = model.embed.weight[ids]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for block in model.blocks:
        a, h = block.attn, rms(x, block.attn_norm)
        split = lambda t, n: t.view(ids.size(0), length, n, cfg.head_dim).transpose(1, 2)
        q = rope(split(h @ a.q_proj.weight.T, cfg.n_head))
        k = rope(split(h @ a.k_proj.weight.T, cfg.n_kv_head)).repeat_interleave(cfg.n_head // cfg.n_kv_head, 1)
        v = split(h @ a.v_proj.weight.T, cfg.n_kv_head).repeat_interleave(cfg.n_head // cfg.n_kv_head, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(ids.size(0), length, -1)
        x = x + y @ a.o_proj.weight.T
        h = rms(x, block.mlp_norm)
        m = block.mlp
        x = x + (F.silu(h @ m.gate.weight.T) * (h @ m.up.weight.T)) @ m.down.weight.T
    return rms(x, model.norm) @ model.lm_head.weight.T


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_matches_written_out_reference(n_kv_head):
    """Logits equal the explicit computation (float32, 1e-5), also with grouped-query K/V."""
    model = small(n_kv_head=n_kv_head)
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(model, ids), rtol=1e-5, atol=1e-5)


def test_position_ids_default_and_shapes():
    """No position_ids means arange(L); `[L]` and `[B, L]` forms agree."""
    model, ids = small(init_std=0.2), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        base = model(ids)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(16)), base, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(16).expand(2, 16)), base, rtol=0, atol=0)
        # Positions are used, and only relatively (RoPE): an offset changes nothing, a
        # permutation does.
        torch.testing.assert_close(model(ids, position_ids=torch.arange(16) + 1000), base, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(ids, position_ids=torch.arange(16).flip(0)), base, atol=1e-3)


def test_key_padding_mask():
    """Left padding masked out gives the unpadded sequence's logits on the real tokens."""
    model, ids = small(), torch.randint(0, 64, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    positions = (torch.arange(16) - 4).clamp(min=0)
    with torch.no_grad():
        out = model(padded, position_ids=positions, attention_mask=mask)[:, 4:]
        torch.testing.assert_close(out, model(ids), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_option():
    tied, untied = small(tie_embeddings=True), small(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight


def test_model_has_no_sequence_parallel_code():
    """The strategy does all of it: the model imports nothing distributed."""
    tree = ast.parse(inspect.getsource(gpt_module))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if "distributed" in m or "lightning" in m}, imported


def test_module_loss_is_token_mean_cross_entropy():
    module = CausalLMModule(net=dict(vocab_size=64, n_layer=1, n_head=2, d_model=16))
    ids = torch.randint(0, 64, (2, 10))
    labels = torch.randint(0, 64, (2, 10))
    labels[0, 3:] = -100  # unequal numbers of labelled tokens per sample
    out = module(ids, labels=labels)
    expected = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)

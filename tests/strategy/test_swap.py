"""The attention swap: what it finds, what it keeps, and that swapped modules compute the
single-device result.

- Parameters (identity), `state_dict` keys and the single-device forward survive swap + restore.
- nn.MultiheadAttention through the ring on 2 ranks equals the module's own forward on the
  whole sequence, output and every parameter gradient (summed over ranks), relative error
  <= 1e-10 in float64, for packed and separate projections, batch_first or not, with bias,
  boolean and additive key padding, and causal masks given as attn_mask or is_causal.
- Masks: key padding and causal (+ padding) are decoded exactly; anything else is rejected.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_seqpar import RingContext, register_attention, unregister_attention
from lightning_seqpar.layout import shard_sequence, unshard_sequence
from lightning_seqpar.swap import restore_attention, ring_context, swap_attention
from lightning_seqpar.swap.masks import CAUSAL, EITHER, FULL, decode_sdpa_mask
from tests.strategy.models import SEQ_LEN, build

# ----- what is found and kept ----------------------------------------------------------------


def test_swap_keeps_parameters_keys_and_single_device_forward():
    for kind in ("lm", "encoder"):
        model = build(kind, True, 2, 2, 2).double()
        batch = next(iter(model.train_dataloader()))
        before = model.logits_and_labels(batch)[0]
        params = {name: id(p) for name, p in model.named_parameters()}
        keys = list(model.state_dict())
        report = swap_attention(model)
        assert report.count == 2
        assert {name: id(p) for name, p in model.named_parameters()} == params
        assert list(model.state_dict()) == keys
        # No ring context active: swapped modules are their single-device selves.
        assert torch.equal(model.logits_and_labels(batch)[0], before)
        restore_attention(report)
        assert list(model.state_dict()) == keys
        assert not any("forward" in vars(m) for m in model.modules())
        assert not any(m._forward_pre_hooks for m in model.modules())


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class CallsHelperMethod(nn.Module):
    def forward(self, q, k, v):
        return self._attend(q, k, v)

    def _attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class CallsModuleFunction(nn.Module):
    def forward(self, q, k, v):
        return _sdpa(q, k, v)


class ManualAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.size(-1) ** 0.5, -1) @ v


def test_sdpa_found_through_helpers_and_manual_attention_reported():
    model = nn.ModuleDict(dict(a=CallsHelperMethod(), b=CallsModuleFunction(), c=ManualAttention(), d=nn.Linear(2, 2)))
    report = swap_attention(model)
    assert report.sdpa == {"a": "CallsHelperMethod", "b": "CallsModuleFunction"}
    assert report.left_alone == {"c": "ManualAttention"}
    assert "left alone: 1 × ManualAttention" in report.describe()
    restore_attention(report)


def test_register_attention_plugs_in_a_custom_class():
    calls = []

    def ring_forward(module, ring, q, k, v):
        calls.append(ring.algorithm)
        return ring.attention(q, k, v)

    register_attention(ManualAttention, ring_forward)
    try:
        module = ManualAttention()
        report = swap_attention(module)
        assert report.registered == {"": "ManualAttention"}
        q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
        with ring_context(RingContext(None, "rsa", "contiguous")):
            out = module(q, k, v)
        assert calls == ["rsa"]
        assert torch.allclose(out, ManualAttention()(q, k, v))
        restore_attention(report)
    finally:
        unregister_attention(ManualAttention)


def test_attention_dropout_is_refused_at_swap():
    with pytest.raises(ValueError, match="dropout=0.0"):
        swap_attention(nn.TransformerEncoderLayer(16, 2, dropout=0.1, batch_first=True))


# ----- masks -----------------------------------------------------------------------------------


def test_sdpa_masks_decoded_exactly_or_rejected():
    batch, length = 2, 6
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[0, 4:] = False
    tril = torch.ones(length, length, dtype=torch.bool).tril()

    keys, kind = decode_sdpa_mask(pad[:, None, None, :], batch, length, length)
    assert kind == FULL and torch.equal(keys, pad)
    keys, kind = decode_sdpa_mask(tril & pad[:, None, None, :], batch, length, length)
    assert kind == CAUSAL and torch.equal(keys, pad)
    additive = torch.zeros(batch, 1, length, length).masked_fill(~(tril & pad[:, None, None, :]), torch.finfo(torch.float32).min)
    keys, kind = decode_sdpa_mask(additive, batch, length, length)
    assert kind == CAUSAL and torch.equal(keys, pad)
    only_first = torch.zeros(batch, length, dtype=torch.bool)
    only_first[:, 0] = True
    assert decode_sdpa_mask(only_first[:, None, None, :].expand(-1, 1, length, -1), batch, length, length)[1] == EITHER

    window = tril & ~torch.ones(length, length, dtype=torch.bool).tril(-3)
    with pytest.raises(ValueError, match="neither causal nor key padding"):
        decode_sdpa_mask(window, batch, length, length)
    with pytest.raises(ValueError, match="soft attention bias"):
        decode_sdpa_mask(torch.randn(length, length), batch, length, length)
    per_head = torch.stack([tril, torch.ones_like(tril)])[None]
    with pytest.raises(ValueError, match="differs between heads"):
        decode_sdpa_mask(per_head, batch, length, length)


# ----- nn.MultiheadAttention through the ring ---------------------------------------------------

EMBED, HEADS, BATCH = 8, 2, 3

MHA_CASES = {
    "packed-batch-first-bool-padding": (dict(batch_first=True), "bool", None),
    "separate-kv-dims-seq-first-additive-padding": (dict(batch_first=False, kdim=6, vdim=5), "additive", None),
    "causal-attn-mask-with-padding": (dict(batch_first=True), "bool", "attn_mask"),
    "is-causal": (dict(batch_first=False), None, "is_causal"),
}


def mha_inputs(case, world):
    kwargs, padding, causal = MHA_CASES[case]
    torch.manual_seed(0)
    module = nn.MultiheadAttention(EMBED, HEADS, bias=True, dtype=torch.float64, **kwargs)
    length = 2 * world * 3
    gen = torch.Generator().manual_seed(1)

    def randn(dim):
        return torch.randn(BATCH, length, dim, generator=gen, dtype=torch.float64)

    query, key, value = randn(EMBED), randn(kwargs.get("kdim", EMBED)), randn(kwargs.get("vdim", EMBED))
    if kwargs.get("kdim") is None:
        key = value = query
    pad = torch.zeros(BATCH, length, dtype=torch.bool)
    pad[0, length // 3 :] = True  # whole chunks of padding on later ranks
    pad[1, -2:] = True
    dout = randn(EMBED)
    return module, query, key, value, pad, padding, causal, kwargs.get("batch_first", False), dout


def call_mha(module, query, key, value, pad, padding, causal, batch_first, length):
    def layout(t):
        return t if batch_first else t.transpose(0, 1)

    kwargs = {}
    if padding == "bool":
        kwargs["key_padding_mask"] = pad
    elif padding == "additive":
        kwargs["key_padding_mask"] = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, float("-inf"))
    if causal == "attn_mask":
        kwargs["attn_mask"] = ~torch.ones(length, length, dtype=torch.bool).tril()  # True = blocked
    elif causal == "is_causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
        kwargs["is_causal"] = True
    out, _ = module(layout(query), layout(key), layout(value), need_weights=False, **kwargs)
    return layout(out)


def mha_on_rank(case):
    rank, world = dist.get_rank(), dist.get_world_size()
    module, query, key, value, pad, padding, causal, batch_first, dout = mha_inputs(case, world)
    cut = lambda t: shard_sequence(t, 1, rank, world, "zigzag")  # noqa: E731
    report = swap_attention(module)
    with ring_context(RingContext(None, "ring", "zigzag")):
        out = call_mha(module, cut(query), cut(key), cut(value), cut(pad), padding, causal, batch_first, cut(pad).size(1))
    out.backward(cut(dout))
    restore_attention(report)
    grads = {}
    for name, p in module.named_parameters():
        dist.all_reduce(p.grad)
        grads[name] = p.grad
    return out.detach(), grads


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_through_ring_equals_module(process_pools, case):
    results = process_pools(2).run_ok(mha_on_rank, case)
    module, query, key, value, pad, padding, causal, batch_first, dout = mha_inputs(case, 2)
    expected = call_mha(module, query, key, value, pad, padding, causal, batch_first, query.size(1))
    expected.backward(dout)
    got = unshard_sequence([r[0] for r in results], 1, "zigzag")
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-10
    for name, p in module.named_parameters():
        err = ((results[0][1][name] - p.grad).norm() / p.grad.norm()).item()
        assert err <= 1e-10, f"{name}: {err:.2e}"

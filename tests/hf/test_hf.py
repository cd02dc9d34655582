"""transformers models under `Trainer(strategy="seqpar")` train exactly like one process on
the whole sequence.

For LlamaForCausalLM (multi-head), Qwen2ForCausalLM (grouped-query, q/k/v biases) and
MistralForCausalLM (one KV head, a sliding window as long as the sequence), built from tiny
configs: sp_size 2 and 4 (zigzag and contiguous layouts; global position_ids for RoPE from the
batch or, when the batch has none, from the integration), right-padded batches whose chunks hold unequal numbers of real tokens (some none), 3
AdamW steps through `HFCausalLMModule`. The baseline is the same module on one process
(attn_implementation "sdpa", whole sequences).

Tolerance (float32): relative Frobenius error <= 1e-5 for every parameter gradient of the first
step, every parameter after the last step, and the predicted logits gathered over the SP group;
every training loss within 1e-5 relative.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from lightning_seqpar import SeqParStrategy
from tests.hf.models import CallsWithLabels, Recorded
from tests.strategy.harness import (
    assert_close_values,
    assert_same_parameters,
    join_pool_world,
    quiet_trainer,
    relative_error,
    snapshot,
)

GLOBAL_BATCH, N_TRAIN, N_PREDICT = 4, 12, 4  # 3 optimizer steps


def fit_and_predict(module, export_dir=None, **trainer_kwargs):
    trainer = quiet_trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module)
    logits = torch.cat(trainer.predict(module))
    result = dict(
        state=snapshot(module), grads=module.first_grads, losses=module.train_losses, logits=logits,
        summary=getattr(trainer.strategy, "summary", None),
        attn_implementation=module.model.config._attn_implementation,
    )
    if export_dir is not None:
        result["exported"] = export(trainer, module, export_dir)
    return result


def export(trainer, module, directory):
    """Save a Lightning checkpoint under the strategy, turn it into a transformers checkpoint
    and load that with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from lightning_seqpar.integrations.hf import export_pretrained

    ckpt = os.path.join(directory, "last.ckpt")
    trainer.save_checkpoint(ckpt)
    if not trainer.is_global_zero:
        return None
    export_pretrained(ckpt, os.path.join(directory, "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(directory, "hf"))
    ckpt_keys = {k.removeprefix("model.") for k in torch.load(ckpt, weights_only=False)["state_dict"]}
    return dict(state=snapshot(loaded), ckpt_keys=ckpt_keys, attn_implementation=loaded.config._attn_implementation)


# Llama: the strategy's injected position_ids (zigzag). Qwen2: none in the batch, so the model
# must get global positions from the integration's hook. Mistral: the contiguous layout.
STRATEGY_KWARGS = {"llama": {}, "qwen2": {"inject_position_ids": False}, "mistral": {"layout": "contiguous"}}


def on_rank(family, sp_size, export_dir=None):
    _, world = join_pool_world()
    module = Recorded(family, False, GLOBAL_BATCH * sp_size // world, N_TRAIN, N_PREDICT)
    strategy = SeqParStrategy(sp_size=sp_size, **STRATEGY_KWARGS[family])
    return fit_and_predict(module, export_dir, devices=world, strategy=strategy)


@functools.lru_cache(maxsize=None)
def baseline(family):
    return fit_and_predict(Recorded(family, True, GLOBAL_BATCH, N_TRAIN, N_PREDICT), devices=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("sp_size", [2, 4])
def test_training_equals_one_process(process_pools, tmp_path, family, sp_size):
    export_dir = str(tmp_path) if (family, sp_size) == ("llama", 2) else None
    results = process_pools(sp_size).run_ok(on_rank, family, sp_size, export_dir)
    expected = baseline(family)
    assert expected["attn_implementation"] == "sdpa"
    for got in results:
        assert_same_parameters(got["grads"], expected["grads"])
        assert_same_parameters(got["state"], expected["state"])
        assert_close_values(got["losses"], expected["losses"])
        assert got["logits"].shape == expected["logits"].shape
        assert relative_error(got["logits"], expected["logits"]) <= 1e-5
        assert got["attn_implementation"] == "sdpa"  # restored at teardown
    layers = {"llama": "LlamaAttention", "qwen2": "Qwen2Attention", "mistral": "MistralAttention"}[family]
    assert f"2 × {layers} (transformers attn_implementation='seqpar')" in results[0]["summary"]
    if export_dir is not None:
        exported = results[0]["exported"]
        # Same keys as the transformers model, same values as trained.
        assert exported["ckpt_keys"] == set(exported["state"])
        trained = {k.removeprefix("model."): v for k, v in results[0]["state"].items()}
        assert_same_parameters(exported["state"], trained, tolerance=0.0)


def refused(module_class, family):
    _, world = join_pool_world()
    module = module_class(family, False, GLOBAL_BATCH, N_TRAIN, N_PREDICT)
    trainer = quiet_trainer(max_epochs=1, devices=world, strategy=SeqParStrategy(sp_size=world))
    try:
        trainer.fit(module)
    except ValueError as err:
        return str(err), module.model.config._attn_implementation
    return None, None


def test_refusals(process_pools):
    pool = process_pools(2)
    for message, implementation in pool.run_ok(refused, Recorded, "mistral_window"):
        assert message is not None, "a sliding window shorter than the sequence was trained as full causal"
        assert "MistralForCausalLM (MistralAttention) uses sliding-window attention (sliding_window=4)" in message
        assert implementation == "sdpa"
    for message, _ in pool.run_ok(refused, CallsWithLabels, "llama"):
        assert message is not None and "LlamaForCausalLM(..., labels=...)" in message
        assert "lightning_seqpar.cross_entropy" in message

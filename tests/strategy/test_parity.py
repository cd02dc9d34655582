"""Training through `Trainer(strategy=SeqParStrategy(...))` equals training on one process
with the whole sequence.

For each (devices, sp_size) and attention algorithm, a causal LM (its own attention calling
SDPA, grouped-query, RoPE fed by the injected global `position_ids`) and an encoder
(nn.TransformerEncoderLayer + a bare nn.MultiheadAttention in [L, B, E] layout, learned
positions from the batch) are trained 5 AdamW steps on padded data whose chunks hold unequal
numbers of valid tokens (some none), then validated. The global batch is the same in every run
(per-device batch = global / dp), and the baseline is the same module with plain
`F.cross_entropy` on one process.

Tolerance: relative Frobenius error <= 1e-5 per parameter tensor (float32); every logged
training loss, validation loss and the validation perplexity (torchmetrics) within 1e-5
relative of the baseline.
"""

from __future__ import annotations

import functools

import pytest

from lightning_seqpar import SeqParStrategy
from tests.strategy.harness import (
    assert_close_values,
    assert_same_parameters,
    join_pool_world,
    quiet_trainer,
    snapshot,
)
from tests.strategy.models import build

GLOBAL_BATCH, N_TRAIN, N_VAL = 4, 20, 8  # 5 optimizer steps, 2 validation batches


def fit(model, **trainer_kwargs):
    trainer = quiet_trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model)
    return dict(
        state=snapshot(model),
        train_losses=model.train_losses,
        val_losses=model.val_losses,
        metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        summary=getattr(trainer.strategy, "summary", None),
    )


def fit_on_rank(kind, sp_size, attention, layout, mask_style):
    _, world = join_pool_world()
    dp = world // sp_size
    model = build(kind, False, GLOBAL_BATCH // dp, N_TRAIN, N_VAL, mask_style=mask_style)
    strategy = SeqParStrategy(sp_size=sp_size, attention=attention, layout=layout)
    return fit(model, devices=world, strategy=strategy)


@functools.lru_cache(maxsize=None)
def baseline(kind, mask_style):
    return fit(build(kind, True, GLOBAL_BATCH, N_TRAIN, N_VAL, mask_style=mask_style), devices=1)


# ring runs in the default (zigzag) layout with dense causal+padding masks, rsa in the
# contiguous layout with is_causal=True, so each layout and mask path is covered; "auto" takes
# the all-gather op at these short chunks (zigzag, is_causal).
ATTENTION = {"ring": ("auto", "dense"), "rsa": ("contiguous", "is_causal"), "auto": ("zigzag", "is_causal")}
CONFIGS = [(2, 2), (4, 2), (4, 4)]


@pytest.mark.parametrize("kind", ["lm", "encoder"])
@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("devices,sp_size", CONFIGS, ids=[f"w{d}-sp{s}" for d, s in CONFIGS])
def test_training_equals_one_process(process_pools, devices, sp_size, attention, kind):
    layout, mask_style = ATTENTION[attention]
    results = process_pools(devices).run_ok(fit_on_rank, kind, sp_size, attention, layout, mask_style)
    expected = baseline(kind, mask_style)
    for rank, got in enumerate(results):
        assert_same_parameters(got["state"], expected["state"])
        assert_close_values(got["train_losses"], expected["train_losses"])
        # Each rank sees its dp share of the validation batches; every value is the global one.
        assert_close_values(got["val_losses"], expected["val_losses"])
        for name in expected["metrics"]:
            assert_close_values([got["metrics"][name]], [expected["metrics"][name]])
    summary = results[0]["summary"]
    dp = devices // sp_size
    assert summary.startswith(f"SeqParStrategy: world {devices} = dp {dp} × sp {sp_size}, attention {attention}")
    if kind == "lm":
        assert "2 × CausalSelfAttention (SDPA)" in summary
    else:
        assert "2 × MultiheadAttention" in summary

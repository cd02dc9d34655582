"""Configurations and inputs that can't work fail with a message naming the fix, on every rank,
within the pool's timeout (a rank that raised alone would leave the others hanging)."""

from __future__ import annotations

import pytest

from lightning_seqpar import SeqParStrategy
from tests.strategy.harness import join_pool_world, quiet_trainer
from tests.strategy.models import build

# (strategy arguments, devices, words the message must contain)
CONFIG_CASES = {
    "sp-not-dividing-world": (dict(sp_size=3), 4, ["sp_size=3", "divides 4", "1, 2, 4"]),
    "sp-larger-than-world": (dict(sp_size=8), 4, ["sp_size=8", "larger than the world", "at most 4"]),
    "unknown-attention": (dict(attention="flash"), 4, ["unknown attention 'flash'", "'ring'", "'rsa'"]),
    "unknown-layout": (dict(layout="striped"), 4, ["unknown layout 'striped'", "'zigzag'"]),
    "bad-sp-size": (dict(sp_size=0), 4, ["sp_size must be a positive int or 'auto'"]),
    "cuda-graphs-not-bool": (dict(cuda_graphs="yes"), 2, ["cuda_graphs must be True or False"]),
    "cuda-graphs-eager-attention": (dict(attention="rsa", cuda_graphs=True), 2,
                                    ["attention='rsa' always runs eagerly", "attention='ring' or 'auto'", "cuda_graphs=False"]),
}


def construct_trainer(strategy_kwargs, devices):
    join_pool_world()
    quiet_trainer(devices=devices, strategy=SeqParStrategy(**strategy_kwargs))


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_invalid_configuration_fails_at_trainer_construction(process_pools, case):
    kwargs, devices, words = CONFIG_CASES[case]
    outcomes = process_pools(devices).run(construct_trainer, kwargs, devices, timeout=60)
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", outcome
        for word in words:
            assert word in outcome.error, (word, outcome.error)


def test_string_form_resolves_auto(process_pools):
    outcomes = process_pools(4).run_ok(string_form_on_rank)
    assert outcomes == [(4, 1, r, 0, "zigzag", "ring") for r in range(4)]


def string_form_on_rank():
    join_pool_world()
    strategy = quiet_trainer(devices=4, strategy="seqpar").strategy
    return strategy.sp_size, strategy.dp_size, strategy.sp_rank, strategy.dp_rank, strategy.layout, strategy.attention


def fit_expecting_failure(kind, seq_len=16, mask_style="dense", sp_size=2, **strategy_kwargs):
    _, world = join_pool_world()
    model = build(kind, False, 2, 4, 4, seq_len=seq_len, mask_style=mask_style)
    trainer = quiet_trainer(devices=world, strategy=SeqParStrategy(sp_size=sp_size, **strategy_kwargs), max_steps=2,
                            limit_val_batches=0)
    trainer.fit(model)


FIT_CASES = {
    "no-attention": (("none",), ["found no attention", "register_attention"]),
    "unsplittable-length": (("lm", 14), ["can't be split by the 'zigzag' layout", "multiple of 4", "pad it to 16"]),
    "sliding-window-mask": (("lm", 16, "window"), ["neither causal nor key padding", "register_attention"]),
    "dataloader-iter-step": (("iterator_step",), ["dataloader_iter", "training_step(self, batch, batch_idx)"]),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_unusable_model_or_batch_fails_on_every_rank(process_pools, case):
    args, words = FIT_CASES[case]
    outcomes = process_pools(2).run(fit_expecting_failure, *args, timeout=90)
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", outcome.trace
        for word in words:
            assert word in outcome.error, (word, outcome.error)


def test_cuda_graphs_off_cuda_fail_on_every_rank(process_pools):
    outcomes = process_pools(2).run(fit_expecting_failure, "lm", cuda_graphs=True, timeout=90)
    words = ["cuda_graphs=True needs CUDA devices and the NCCL backend", "on cpu with gloo", "set cuda_graphs=False"]
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", outcome.trace
        for word in words:
            assert word in outcome.error, (word, outcome.error)

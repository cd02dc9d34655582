"""`SeqParStrategy(check_batch_consistency=N)` hashes each of the first N whole batches and
compares the hashes inside every SP group. Ranks of one group that received different batches
(augmentation seeded by global rank; a sampler built over the world instead of the dp ranks)
fail on every rank, within the pool's timeout, with a message naming the likely causes; equal
batches pass (the padding tests run with the check on)."""

from __future__ import annotations

import pytest

from lightning_seqpar import SeqParStrategy
from tests.reliability.models import GlobalRankSampler, RankSeededAugmentation
from tests.strategy.harness import join_pool_world, quiet_trainer
from tests.strategy.models import lm_samples


def fit_with_check(model_cls, check):
    _, world = join_pool_world()
    model = model_cls(reference=False, batch_size=2, train=lm_samples(8, 0), val=lm_samples(2, 1))
    trainer = quiet_trainer(
        devices=world, strategy=SeqParStrategy(sp_size=2, check_batch_consistency=check), max_steps=2,
        limit_val_batches=0, use_distributed_sampler=model_cls is not GlobalRankSampler,
    )
    trainer.fit(model)
    return trainer.global_step


@pytest.mark.parametrize("model_cls", [RankSeededAugmentation, GlobalRankSampler])
def test_group_with_different_batches_fails_on_every_rank(process_pools, model_cls):
    outcomes = process_pools(2).run(fit_with_check, model_cls, 3, timeout=90)
    for outcome in outcomes:
        assert outcome.error_type == "ValueError", outcome.trace
        for words in ["ranks [0, 1] of one sequence-parallel group received different batches at batch 0",
                      "distributed_sampler_kwargs", "seed_everything", "augmentation"]:
            assert words in outcome.error, (words, outcome.error)


def test_check_is_opt_in(process_pools):
    # Without the check the wrong batches train silently: why the option exists.
    assert process_pools(2).run_ok(fit_with_check, RankSeededAugmentation, 0) == [2, 2]

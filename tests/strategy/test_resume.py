"""A checkpoint written under one sp_size resumes under another, or on one device without
sequence parallelism, and ends where an uninterrupted one-process run ends.

Epoch 1 runs on 2 processes (dp 1 × sp 2) and saves; epoch 2 resumes on 4 processes
(dp 1 × sp 4) and, separately, on one process with plain DDP-free training. Tolerance: relative
Frobenius error <= 1e-5 per parameter tensor (float32) against one process training both
epochs without interruption.
"""

from __future__ import annotations

from lightning_seqpar import SeqParStrategy
from tests.strategy.harness import assert_same_parameters, join_pool_world, quiet_trainer, snapshot
from tests.strategy.models import build

BATCH, N_TRAIN, N_VAL = 4, 12, 4  # 3 optimizer steps per epoch


def train_on_rank(sp_size, max_epochs, ckpt_in, ckpt_out):
    _, world = join_pool_world()
    model = build("lm", False, BATCH, N_TRAIN, N_VAL, seed=1)
    trainer = quiet_trainer(devices=world, strategy=SeqParStrategy(sp_size=sp_size), max_epochs=max_epochs)
    trainer.fit(model, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return snapshot(model)


def train_one_process(max_epochs, ckpt_in=None):
    model = build("lm", True, BATCH, N_TRAIN, N_VAL, seed=1)
    quiet_trainer(devices=1, max_epochs=max_epochs).fit(model, ckpt_path=ckpt_in)
    return snapshot(model)


def test_resume_into_another_sp_size_and_into_one_device(process_pools, tmp_path):
    checkpoint = str(tmp_path / "epoch1.ckpt")
    process_pools(2).run_ok(train_on_rank, 2, 1, None, checkpoint)
    resumed_sp4 = process_pools(4).run_ok(train_on_rank, 4, 2, checkpoint, None)
    uninterrupted = train_one_process(2)
    for params in resumed_sp4:
        assert_same_parameters(params, uninterrupted)
    assert_same_parameters(train_one_process(2, checkpoint), uninterrupted)

"""Resuming in the middle of an epoch (`lightning_seqpar.sampler`, the strategy's checkpoints).

Unit tests of the training loader's position, in this process:
- its state round-trips: a loader restored from it yields exactly the rest of the epoch (order
  of that epoch, the consumed batches skipped), dataloader workers' prefetching included; a
  complete epoch's state starts the next epoch whole; a state from another dp size restarts the
  epoch and says why; loaders whose position can't be restored by skipping batches are left alone.

Training on a pool of 2 processes (dp 2 × sp 1 and dp 1 × sp 2, dropout on, num_workers=0): a
run resumed from a checkpoint saved every 3 steps (the last one mid-epoch) ends with exactly
(torch.equal) the parameters of the uninterrupted run, on every rank. The same checkpoint also
resumes on one process without the strategy (the loader position is then Lightning's business:
it warns that the loader isn't resumable, but doesn't refuse the checkpoint); under the strategy,
a mid-epoch checkpoint without the position (an older one) restarts the epoch with a warning.
SIGKILL and the script launcher: test_faults.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from lightning_seqpar import SeqParStrategy
from lightning_seqpar.sampler import ResumableSampler, make_resumable
from lightning_seqpar.strategy import LOADER_STATES_KEY
from tests.reliability.models import build_bidirectional
from tests.strategy.harness import join_pool_world, quiet_trainer, snapshot

N, BATCH, EPOCH = 22, 3, 4  # 22 samples over 2 replicas: 11 each, 4 batches (the last of 2)


class Reported:
    def __init__(self):
        self.calls: list[tuple[bool, str | None]] = []

    def __call__(self, resumed, problem):
        self.calls.append((resumed, problem))


def loader(rank=0, replicas=2, workers=0, progress=lambda: (0, False), on_load=None):
    sampler = DistributedSampler(range(N), num_replicas=replicas, rank=rank, shuffle=True, seed=5)
    dl = DataLoader(range(N), batch_size=BATCH, sampler=sampler, num_workers=workers)
    assert make_resumable(dl, progress, on_load or Reported())
    dl.batch_sampler.sampler.set_epoch(EPOCH)  # what Lightning does at each epoch's start
    return dl


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("consumed", [1, 3])
def test_state_round_trip_resumes_after_the_consumed_batches(rank, consumed, workers):
    whole = [b.tolist() for b in loader(rank)]
    running = loader(rank, workers=workers, progress=lambda: (consumed, False))  # the loop's count
    batches = iter(running)
    seen = [next(batches).tolist() for _ in range(consumed)]  # workers have read further ahead
    state = running.state_dict()
    del batches
    assert seen == whole[:consumed]

    report = Reported()
    restored = loader(rank, workers=workers, on_load=report)
    restored.batch_sampler.sampler.set_epoch(0)  # a fresh sampler: the state sets the epoch
    restored.load_state_dict(state)
    assert report.calls == [(True, None)]
    assert [b.tolist() for b in restored] == whole[consumed:]
    assert [b.tolist() for b in restored] == whole  # once: the next iteration is whole
    assert len(restored) == len(whole)  # Lightning counts the epoch's batches from the position


def test_complete_epoch_starts_the_next_epoch_whole():
    state = loader(progress=lambda: (EPOCH, True)).state_dict()
    report = Reported()
    restored = loader(on_load=report)
    restored.load_state_dict(state)
    assert report.calls == [(False, None)]
    assert restored.batch_sampler.sampler.epoch == EPOCH + 1
    expected = loader()
    expected.batch_sampler.sampler.set_epoch(EPOCH + 1)
    assert [b.tolist() for b in restored] == [b.tolist() for b in expected]


def test_another_dp_size_restarts_the_epoch_and_says_why():
    state = loader(progress=lambda: (2, False)).state_dict()
    report = Reported()
    restored = loader(replicas=4, on_load=report)
    restored.load_state_dict(state)
    assert report.calls[0][0] is False
    assert "num_replicas 2 -> 4" in report.calls[0][1]
    assert len([b for b in restored]) == len(restored)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(N))


def test_loaders_that_cannot_skip_whole_batches_are_left_alone():
    custom = DataLoader(range(N), batch_sampler=[[0, 1], [2]])  # a batch sampler of its own
    iterable = DataLoader(Stream(), batch_size=BATCH)
    for dl in (custom, iterable):
        assert not make_resumable(dl, lambda: (0, False), Reported())
        assert not hasattr(dl, "state_dict")
    wrapped = DataLoader(range(N), batch_size=BATCH)
    assert make_resumable(wrapped, lambda: (0, False), Reported())
    assert isinstance(wrapped.batch_sampler.sampler, ResumableSampler)
    assert type(wrapped.batch_sampler) is BatchSampler


# ----- training on a pool of 2 processes ---------------------------------------------------

N_TRAIN, SEQ = 24, 16  # global batch 4: 6 steps per epoch
EVERY, EPOCHS = 3, 2


def fit_on_rank(sp_size, out, ckpt_path):
    """(parameters, batches per epoch, warnings) of a 2-epoch run with checkpoints every 3 steps."""
    _, world = join_pool_world()
    model = build_bidirectional(False, 4 // (world // sp_size), N_TRAIN, SEQ, seed=3, dropout=0.2)
    checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=EVERY, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        devices=world, strategy=SeqParStrategy(sp_size=sp_size), max_epochs=EPOCHS, limit_val_batches=0,
        callbacks=[checkpoints], enable_checkpointing=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    return snapshot(model), trainer.num_training_batches, [str(w.message) for w in caught]


@pytest.mark.parametrize("sp_size", [1, 2], ids=["dp2-sp1", "dp1-sp2"])
def test_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(process_pools, tmp_path, sp_size):
    uninterrupted = process_pools(2).run_ok(fit_on_rank, sp_size, str(tmp_path / "run"), None)
    per_epoch = uninterrupted[0][1]
    # the last checkpoint inside an epoch of the run's second half
    step = max(s for s in range(EVERY, per_epoch * EPOCHS, EVERY) if s % per_epoch)
    assert step > per_epoch
    checkpoint = tmp_path / "run" / f"step={step}.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert LOADER_STATES_KEY in saved and "combined_loader" not in saved["loops"]["fit_loop"]["state_dict"]
    assert saved[LOADER_STATES_KEY][0]["batches"] == step % per_epoch

    resumed = process_pools(2).run_ok(fit_on_rank, sp_size, str(tmp_path / "resumed"), str(checkpoint))
    for (got, _, messages), (expected, _, _) in zip(resumed, uninterrupted):
        assert not [m for m in messages if "not resumable" in m or "restarts from its beginning" in m], messages
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name

    # Without the position (an older checkpoint): the epoch restarts, and rank 0 says so.
    del saved[LOADER_STATES_KEY]
    torch.save(saved, tmp_path / "no_position.ckpt")
    restarted = process_pools(2).run_ok(fit_on_rank, sp_size, str(tmp_path / "restarted"), str(tmp_path / "no_position.ckpt"))
    assert any("holds no position of the training data" in m for m in restarted[0][2])

    # One process, no strategy: the checkpoint loads; the data restarts the epoch, as Lightning warns.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_bidirectional(True, 4, N_TRAIN, SEQ, seed=3, dropout=0.2)
        quiet_trainer(devices=1, max_epochs=EPOCHS, limit_val_batches=0).fit(model, ckpt_path=str(checkpoint))
    assert any("dataloader is not resumable" in str(w.message) for w in caught)

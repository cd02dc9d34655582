"""`SeqParStrategy(pad_to_multiple=True)`: a sequence length the layout can't split (14 over
sp 2 zigzag needs a multiple of 4; over sp 4 contiguous, of 4) is right-padded to 16 with
ignored labels and masked keys, and training equals one process on the *unpadded* 14-token
sequences.

Models: the causal LM of the strategy tests (dense causal-and-padding mask built from the
batch's `attention_mask`, which the strategy extends with False) and an unmasked bidirectional
model (no mask at all: only the strategy's ring-level key masking keeps the padded keys out).
Each trains 4 AdamW steps. Tolerance: relative Frobenius error <= 1e-5 per parameter tensor
(float32), every training loss within 1e-5 relative; predictions come back with the unpadded
length and equal one process's within 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_seqpar import SeqParStrategy
from lightning_seqpar.data_utils import pad_batch
from tests.reliability.models import TinyBidirectional, build_bidirectional
from tests.strategy.harness import assert_close_values, assert_same_parameters, join_pool_world, quiet_trainer, snapshot
from tests.strategy.models import build

SEQ_LEN, GLOBAL_BATCH, N_TRAIN = 14, 4, 16  # 4 optimizer steps


def make(kind, reference, batch_size):
    if kind == "bidirectional":
        return build_bidirectional(reference, batch_size, N_TRAIN, SEQ_LEN)
    return build("lm", reference, batch_size, N_TRAIN, 4, seq_len=SEQ_LEN)


def fit_and_predict(model, **trainer_kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(model)
    predictions = trainer.predict(model) if isinstance(model, TinyBidirectional) else None
    return dict(state=snapshot(model), losses=model.train_losses, predictions=predictions)


def fit_on_rank(kind, sp_size, layout):
    _, world = join_pool_world()
    model = make(kind, False, GLOBAL_BATCH // (world // sp_size))
    strategy = SeqParStrategy(sp_size=sp_size, layout=layout, pad_to_multiple=True, check_batch_consistency=2)
    return fit_and_predict(model, devices=world, strategy=strategy)


@functools.lru_cache(maxsize=None)
def baseline(kind):
    return fit_and_predict(make(kind, True, GLOBAL_BATCH), devices=1)


CASES = [("lm", 2, 2, "zigzag"), ("bidirectional", 2, 2, "zigzag"), ("bidirectional", 4, 4, "contiguous")]


@pytest.mark.parametrize("kind,devices,sp_size,layout", CASES, ids=[f"{k}-w{d}-sp{s}-{l}" for k, d, s, l in CASES])
def test_padded_training_equals_unpadded_one_process(process_pools, kind, devices, sp_size, layout):
    results = process_pools(devices).run_ok(fit_on_rank, kind, sp_size, layout)
    expected = baseline(kind)
    for got in results:
        assert_same_parameters(got["state"], expected["state"])
        assert_close_values(got["losses"], expected["losses"])
    if expected["predictions"] is not None:
        # Predictions: each dp rank predicts its share; rank 0 holds its group's first batch.
        got = results[0]["predictions"][0]
        assert got.shape[1] == SEQ_LEN, got.shape
        ref = expected["predictions"][0][: got.size(0)]
        assert (got - ref).norm() <= 1e-5 * ref.norm()


def test_padding_refuses_a_batch_without_ignorable_labels():
    batch = {"input_ids": torch.ones(2, 6, dtype=torch.long), "target": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"no sequence tensor .* under one of the keys \['labels'\].*pad_values"):
        pad_batch(batch, 4, pad_values={"labels": -100})
    padded, length, padded_length = pad_batch(batch, 4, pad_values={"target": -100})
    assert (length, padded_length) == (6, 8)
    assert padded["target"][:, 6:].eq(-100).all() and padded["input_ids"][:, 6:].eq(0).all()

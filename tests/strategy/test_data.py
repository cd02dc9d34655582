"""Batches, groups and data under the strategy.

- `shard_batch` cuts exactly the sequence tensors of any container, in the layout, and
  `seq_keys` narrows the choice; an unsplittable length names the fix.
- The mesh: rank r sits at (dp r // sp, sp r % sp), groups as such, the mesh is reachable from
  the LightningModule and reused by a second Trainer of the same world.
- Every rank of an SP group reads the same samples with the same random augmentation from
  dataloader workers (seeded by dp rank, no `seed_everything`), different dp groups differ.
- `predict` returns whole sequences, in order, equal to one-device logits (relative error
  <= 1e-5, float32).
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lightning_seqpar import DataParallelShard, SeqParStrategy
from lightning_seqpar.data_utils import shard_batch
from lightning_seqpar.layout import shard_sequence
from tests.strategy.harness import join_pool_world, quiet_trainer, relative_error
from tests.strategy.models import TinyCausalLM, build, lm_samples

L = 8


def _cut(t, dim=1, rank=1, world=2, layout="zigzag"):
    return shard_sequence(t, dim, rank, world, layout)


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor
    sample_weight: torch.Tensor


Pair = namedtuple("Pair", ["tokens", "labels"])


def test_shard_batch_cuts_sequence_tensors_of_any_container():
    ids = torch.arange(2 * L).view(2, L)
    per_sample = torch.tensor([1.0, 2.0])
    other = torch.zeros(2, 3)
    batch = {"input_ids": ids, "labels": ids + 100, "weight": per_sample, "extra": other, "nested": [ids, (ids,)]}
    local, seq_len = shard_batch(batch, rank=1, world_size=2, layout="zigzag")
    assert seq_len == L
    for key in ("input_ids", "labels"):
        assert torch.equal(local[key], _cut(batch[key]))
    assert local["weight"] is per_sample and local["extra"] is other
    assert torch.equal(local["nested"][1][0], _cut(ids))

    local, _ = shard_batch((ids, per_sample), rank=0, world_size=2, layout="contiguous")
    assert torch.equal(local[0], ids[:, : L // 2]) and local[1] is per_sample
    local, _ = shard_batch(Batch(ids, per_sample), rank=1, world_size=2, layout="zigzag")
    assert isinstance(local, Batch) and torch.equal(local.input_ids, _cut(ids))
    local, _ = shard_batch(Pair(ids, ids), rank=1, world_size=2, layout="zigzag")
    assert isinstance(local, Pair) and torch.equal(local.labels, _cut(ids))

    # seq_keys narrows; a 1-D position_ids of the sequence length is cut along its only dim.
    batch = {"input_ids": ids, "mask_like": ids.clone(), "position_ids": torch.arange(L)}
    local, _ = shard_batch(batch, rank=1, world_size=2, layout="zigzag", seq_keys=("input_ids",))
    assert local["mask_like"] is batch["mask_like"]
    assert torch.equal(local["position_ids"], _cut(torch.arange(L), dim=0))

    # [L, B] layout with seq_dim=0
    local, _ = shard_batch(ids.T.contiguous(), rank=1, world_size=2, layout="zigzag", seq_dim=0)
    assert torch.equal(local, _cut(ids.T, dim=0))


def test_shard_batch_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiple of 4; pad it to 12"):
        shard_batch({"input_ids": torch.zeros(2, 10)}, rank=0, world_size=2, layout="zigzag")
    with pytest.raises(ValueError, match="set seq_dim"):
        shard_batch({"weight": torch.zeros(2)}, rank=0, world_size=2, layout="zigzag")
    with pytest.raises(ValueError, match="fix seq_keys"):
        shard_batch({"input_ids": torch.zeros(2, 8)}, rank=0, world_size=2, layout="zigzag", seq_keys=("tokens",))


def test_data_parallel_shard_partitions_an_iterable():
    parts = [list(DataParallelShard(range(10), r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    loader = DataLoader(DataParallelShard(range(12), 1, 2), batch_size=None, num_workers=2)
    assert sorted(loader) == [1, 3, 5, 7, 9, 11]


# ----- on 4 ranks: groups, mesh, samplers, workers ----------------------------------------------


class RecordsBatches(TinyCausalLM):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.seen.append(batch["input_ids"].tolist())
        return batch


def worker_draws(loader: DataLoader, worker_id: int) -> list[float]:
    """What a dataloader worker of `loader` would draw: the loader's base seed comes from its
    generator, the worker's torch seed is base + id, then worker_init_fn runs (as in
    torch.utils.data's worker loop; pool processes are daemonic and can't start workers)."""
    base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())
    torch.manual_seed(base_seed + worker_id)
    loader.worker_init_fn(worker_id)
    return torch.rand(3).tolist()


def groups_and_data_on_rank():
    rank, world = join_pool_world()
    torch.manual_seed(100 + rank)  # no seed_everything: the ranks' global RNGs differ
    model = RecordsBatches(reference=False, batch_size=2, train=lm_samples(8, 0), val=None)
    strategy = SeqParStrategy(sp_size=2)
    trainer = quiet_trainer(devices=world, strategy=strategy, max_epochs=1, limit_val_batches=0)
    trainer.fit(model)
    loader = strategy.process_dataloader(DataLoader(lm_samples(4, 0), batch_size=2, num_workers=2))
    mesh_again = quiet_trainer(devices=world, strategy=SeqParStrategy(sp_size=2))
    mesh_again.strategy.setup_environment()
    return dict(
        ranks=(strategy.dp_rank, strategy.sp_rank),
        sp_group=dist.get_process_group_ranks(strategy.sp_group),
        dp_group=dist.get_process_group_ranks(strategy.dp_group),
        module_mesh=model.device_mesh is strategy.mesh,
        cached=mesh_again.strategy.mesh is strategy.mesh,
        seen=model.seen,
        worker_draws=[worker_draws(loader, w) for w in range(2)],
    )


def test_groups_mesh_and_sp_consistent_data(process_pools):
    results = process_pools(4).run_ok(groups_and_data_on_rank)
    for rank, res in enumerate(results):
        assert res["ranks"] == (rank // 2, rank % 2)
        assert res["sp_group"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert res["dp_group"] == [rank % 2, rank % 2 + 2]
        assert res["module_mesh"] and res["cached"]
    # The same samples inside an SP group, disjoint halves across dp groups.
    assert results[0]["seen"] == results[1]["seen"] and results[2]["seen"] == results[3]["seen"]
    rows = lambda res: {tuple(row) for batch in res["seen"] for row in batch}  # noqa: E731
    assert rows(results[0]).isdisjoint(rows(results[2])) and len(rows(results[0]) | rows(results[2])) == 8
    # Worker randomness: equal inside an SP group, different across workers and dp groups.
    draws = [res["worker_draws"] for res in results]
    assert draws[0] == draws[1] and draws[2] == draws[3]
    assert draws[0][0] != draws[0][1] and draws[0] != draws[2]


# ----- predict ---------------------------------------------------------------------------------


def predict_on_rank():
    _, world = join_pool_world()
    model = build("lm", False, 2, 4, 6)
    return quiet_trainer(devices=world, strategy=SeqParStrategy(sp_size=world)).predict(model)


def test_predict_returns_whole_sequences_in_order(process_pools):
    results = process_pools(2).run_ok(predict_on_rank)
    model = build("lm", True, 2, 4, 6)
    expected = quiet_trainer(devices=1).predict(model)
    for predictions in results:
        assert len(predictions) == len(expected) == 3
        for got, ref in zip(predictions, expected):
            assert got.shape == ref.shape
            assert relative_error(got, ref) <= 1e-5

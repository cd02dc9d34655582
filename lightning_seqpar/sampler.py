"""Resuming the training data in the middle of an epoch.

What Lightning 2.6 does on its own (fit_loop.py, training_epoch_loop.py, combined_loader.py):
it restarts a mid-epoch checkpoint at the saved batch count (`batch_idx`, the epoch's length
and the sampler's epoch all continue), but it re-creates the epoch's data iterator from the
start. Only a training dataloader that has `state_dict` / `load_state_dict` is told where it
was: Lightning stores `loader.state_dict()` with the loops' state, and calls
`loader.load_state_dict(...)` right before it creates the iterator, only when it restarts
inside an epoch (or, training by `max_steps`, on every resume). A sampler's own `state_dict` is
never looked at.

So `make_resumable` gives the training DataLoader those two methods, and wraps the sampler
inside its `BatchSampler` in a `ResumableSampler`, which starts the restored epoch after the
samples already consumed. The count comes from the training loop (batches handed to
`training_step`), not from the sampler: the sampler runs ahead of training by the batches that
dataloader workers prefetch. Every rank of a sequence-parallel group has the same sampler
(dp rank, dp size), so each skips the same samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

__all__ = ["ResumableSampler", "make_resumable", "LOADER_STATE_MARK"]

# Present in every state this module writes: the strategy recognises its own loader states in a
# checkpoint by it.
LOADER_STATE_MARK = "seqpar_loader_position"


class ResumableSampler(Sampler[int]):
    """Wraps a sampler (the dp-split `DistributedSampler` Lightning injects, or any sampler whose
    order depends only on its epoch) and can start one epoch after its first `skip` indices.

    Its length stays the whole epoch's: Lightning counts the restored epoch's batches from the
    saved position up to that length."""

    def __init__(self, sampler: Sampler | Any) -> None:
        self.sampler = sampler
        self.epoch: int = getattr(sampler, "epoch", 0)
        self._skip: tuple[int, int] | None = None  # (epoch, indices) for the next iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_inner = getattr(self.sampler, "set_epoch", None)
        if callable(set_inner):
            set_inner(epoch)

    def skip_next(self, epoch: int, indices: int) -> None:
        """The next iteration, if it is of `epoch`, starts after its first `indices` indices."""
        self._skip = (epoch, indices)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, None  # once: later epochs run whole
        indices = iter(self.sampler)
        if skip is not None and skip[0] == self.epoch and skip[1] > 0:
            indices = itertools.islice(indices, skip[1], None)
        return indices


def make_resumable(
    dataloader: DataLoader,
    progress: Callable[[], tuple[int, bool]],
    on_load: Callable[[bool, str | None], None],
) -> bool:
    """Give a training `dataloader` the `state_dict` / `load_state_dict` that Lightning saves
    with a checkpoint and restores on a mid-epoch restart. False (and the loader untouched)
    where the position can't be restored by skipping whole batches of the sampler: an
    iterable dataset, no automatic batching, or a batch sampler other than `BatchSampler`.

    `progress()` gives (batches of this epoch handed to training so far, whether the epoch is
    done). `on_load(resumed, problem)` is told what a restore did: `resumed` when the next
    iteration starts at the saved position inside the epoch; `problem` says why the saved position
    can't be used (the epoch then restarts from its beginning), None if nothing is wrong.
    """
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    if isinstance(dataloader.dataset, IterableDataset) or type(batch_sampler) is not BatchSampler:
        return False
    sampler = batch_sampler.sampler
    if not isinstance(sampler, ResumableSampler):
        sampler = batch_sampler.sampler = ResumableSampler(sampler)
    batch_size = batch_sampler.batch_size

    def state_dict() -> dict[str, Any]:
        batches, epoch_done = progress()
        return {
            LOADER_STATE_MARK: 1,
            "epoch": sampler.epoch,
            "batches": batches,
            "epoch_done": epoch_done,
            "batch_size": batch_size,
            "samples": len(sampler),
            "num_replicas": _replicas(sampler),
        }

    def load_state_dict(state: dict[str, Any]) -> None:
        here = {"batch_size": batch_size, "samples": len(sampler), "num_replicas": _replicas(sampler)}
        changed = [f"{key} {state.get(key)} -> {value}" for key, value in here.items() if state.get(key) != value]
        if state["epoch_done"]:
            # Lightning goes on with the next epoch, but creates its iterator (and dataloader
            # workers start reading) before it sets that epoch on the sampler: set it now.
            sampler.set_epoch(state["epoch"] + 1)
            on_load(False, None)
        elif changed:
            on_load(False, f"the data-parallel sampling changed since the checkpoint ({', '.join(changed)})")
        else:
            sampler.set_epoch(state["epoch"])
            sampler.skip_next(state["epoch"], state["batches"] * batch_size)
            on_load(state["batches"] > 0, None)

    dataloader.state_dict = state_dict
    dataloader.load_state_dict = load_state_dict
    return True


def _replicas(sampler: ResumableSampler) -> int | None:
    return getattr(sampler.sampler, "num_replicas", None)

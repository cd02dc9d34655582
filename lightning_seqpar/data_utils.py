"""Batches and datasets under sequence parallelism: cutting a batch's sequences for one rank,
putting outputs back together, and sharding iterable datasets over the data-parallel ranks.

Plain functions; `SeqParStrategy` calls them from its hooks.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from lightning_seqpar.layout import check_splittable, shard_sequence, unshard_sequence

__all__ = [
    "DataParallelShard", "batch_digest", "batch_sequence_length", "gather_sequence", "map_tensors", "pad_batch",
    "shard_batch",
]

POSITION_IDS_KEY = "position_ids"
INPUT_IDS_KEY = "input_ids"


def map_tensors(obj: Any, fn: Callable[[torch.Tensor, str | None], torch.Tensor], key: str | None = None) -> Any:
    """Apply `fn(tensor, key)` to every tensor of a nested batch (mapping, dataclass, named or
    plain tuple, list), rebuilding containers of the same type. `key` is the nearest mapping key
    or dataclass field name above the tensor (None inside bare tuples and lists at the top)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, key)
    if isinstance(obj, Mapping):
        mapped = {k: map_tensors(v, fn, k if isinstance(k, str) else key) for k, v in obj.items()}
        try:
            return type(obj)(mapped)
        except TypeError:
            return mapped
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, map_tensors(getattr(obj, f.name), fn, f.name))
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(getattr(obj, f), fn, f) for f in obj._fields))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, key) for v in obj)
    return obj


def _tensors(obj: Any) -> list[tuple[str | None, torch.Tensor]]:
    found: list[tuple[str | None, torch.Tensor]] = []

    def visit(t: torch.Tensor, key: str | None) -> torch.Tensor:
        found.append((key, t))
        return t

    map_tensors(obj, visit)
    return found


def batch_sequence_length(batch: Any, seq_dim: int = 1, seq_keys: Sequence[str] | None = None) -> int:
    """The global sequence length of a batch.

    With `seq_keys`: the length along `seq_dim` of the first tensor under one of those keys.
    Otherwise: that of `input_ids` when the batch has such a key, else the largest size along
    `seq_dim` among tensors that have that dim.
    """
    tensors = _tensors(batch)
    if seq_keys is not None:
        chosen = [t for k, t in tensors if k in seq_keys and t.dim() > seq_dim]
        if not chosen:
            raise ValueError(
                f"no tensor of the batch is under one of seq_keys={list(seq_keys)} with a dim {seq_dim}; "
                f"the batch holds {sorted({str(k) for k, _ in tensors})}: fix seq_keys (they name mapping "
                f"keys or dataclass fields)"
            )
        return chosen[0].size(seq_dim)
    with_dim = [(k, t) for k, t in tensors if t.dim() > seq_dim]
    if not with_dim:
        raise ValueError(
            f"no tensor of the batch has a sequence dim {seq_dim} to cut (shapes "
            f"{[tuple(t.shape) for _, t in tensors]}): set seq_dim to where the sequence is"
        )
    for k, t in with_dim:
        if k == INPUT_IDS_KEY:
            return t.size(seq_dim)
    return max(t.size(seq_dim) for _, t in with_dim)


def _is_sequence_tensor(t: torch.Tensor, key: str | None, seq_len: int, seq_dim: int, seq_keys) -> bool:
    if seq_keys is not None and key not in seq_keys and key != POSITION_IDS_KEY:
        return False
    return t.dim() > seq_dim and t.size(seq_dim) == seq_len


def shard_batch(
    batch: Any,
    *,
    rank: int,
    world_size: int,
    layout: str,
    seq_dim: int = 1,
    seq_keys: Sequence[str] | None = None,
) -> tuple[Any, int]:
    """Cut every sequence tensor of `batch` along `seq_dim` for `rank` of a group of `world_size`.

    Sequence tensors: those whose size along `seq_dim` equals the batch's sequence length
    (see `batch_sequence_length`); with `seq_keys`, only those under these keys. A 1-D
    `position_ids` of that length is cut too. Everything else passes unchanged.
    Returns `(local batch, global sequence length)`; raises ValueError when the layout can't
    split the length.
    """
    seq_keys = None if seq_keys is None else tuple(seq_keys)
    seq_len = batch_sequence_length(batch, seq_dim, seq_keys)
    check_splittable(seq_len, world_size, layout)

    def cut(t: torch.Tensor, key: str | None) -> torch.Tensor:
        if _is_sequence_tensor(t, key, seq_len, seq_dim, seq_keys):
            return shard_sequence(t, seq_dim, rank, world_size, layout)
        if key == POSITION_IDS_KEY and t.dim() == 1 and t.size(0) == seq_len:
            return shard_sequence(t, 0, rank, world_size, layout)
        return t

    return map_tensors(batch, cut), seq_len


def pad_batch(
    batch: Any,
    multiple: int,
    *,
    pad_values: Mapping[str, int | float | bool],
    seq_dim: int = 1,
    seq_keys: Sequence[str] | None = None,
) -> tuple[Any, int, int]:
    """Right-pad every sequence tensor of `batch` along `seq_dim` to a multiple of `multiple`.

    Sequence tensors are chosen as in `shard_batch`. A tensor under a key of `pad_values` is
    padded with that value (e.g. `{"labels": -100}`: padded tokens are ignored by the loss);
    `position_ids` continue counting (L, L+1, ...); everything else gets 0 (False for bool, so
    an `attention_mask` marks the padding as not real). Returns `(batch, length, padded
    length)`; the batch is returned as is when the length is already a multiple.

    Raises ValueError when padding is needed but no sequence tensor sits under a key of
    `pad_values`: the padded tokens would then count as real labels.
    """
    seq_keys = None if seq_keys is None else tuple(seq_keys)
    seq_len = batch_sequence_length(batch, seq_dim, seq_keys)
    padded_len = -(-seq_len // multiple) * multiple
    if padded_len == seq_len:
        return batch, seq_len, seq_len
    extra = padded_len - seq_len
    padded_keys: list[str] = []

    def pad(t: torch.Tensor, key: str | None) -> torch.Tensor:
        is_1d_positions = key == POSITION_IDS_KEY and t.dim() == 1 and t.size(0) == seq_len
        if not (is_1d_positions or _is_sequence_tensor(t, key, seq_len, seq_dim, seq_keys)):
            return t
        dim = 0 if is_1d_positions else seq_dim
        shape = list(t.shape)
        shape[dim] = extra
        if key == POSITION_IDS_KEY:
            view = [1] * t.dim()
            view[dim] = extra
            tail = torch.arange(seq_len, padded_len, dtype=t.dtype, device=t.device).view(view).expand(shape)
        else:
            if key in pad_values:
                padded_keys.append(key)
            tail = torch.full(shape, pad_values.get(key, 0), dtype=t.dtype, device=t.device)
        return torch.cat([t, tail], dim=dim)

    padded = map_tensors(batch, pad)
    if not padded_keys:
        raise ValueError(
            f"pad_to_multiple pads sequence length {seq_len} to {padded_len}, but no sequence tensor of "
            f"the batch is under one of the keys {sorted(pad_values)} whose padding the loss ignores "
            f"(the batch holds {sorted({str(k) for k, _ in _tensors(batch)})}): padded tokens would "
            f"count as real labels. Name your label key in pad_values, e.g. pad_values={{'target': -100}}, "
            f"or pad the batch yourself"
        )
    return padded, seq_len, padded_len


def batch_digest(batch: Any) -> int:
    """A 63-bit hash of every tensor of a batch (its key, dtype, shape and bytes), for checking
    that the ranks of one sequence-parallel group received the same batch."""
    digest = hashlib.blake2b(digest_size=8)
    for key, t in _tensors(batch):
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(digest.digest(), "little") >> 1


def gather_sequence(outputs: Any, *, group, layout: str, seq_dim: int, local_len: int) -> Any:
    """Inverse of `shard_batch` for outputs: every tensor whose size along `seq_dim` is
    `local_len` is all-gathered over `group` and put back in global order; others pass as they
    are. Every rank of the group must call it with outputs of the same structure."""
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

    def gather(t: torch.Tensor, key: str | None) -> torch.Tensor:
        if world == 1 or t.dim() <= seq_dim or t.size(seq_dim) != local_len:
            return t
        chunks = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(chunks, t.contiguous(), group=group)
        return unshard_sequence(chunks, seq_dim, layout)

    return map_tensors(outputs, gather)


class DataParallelShard(IterableDataset):
    """The items of an iterable that belong to one data-parallel rank (and, inside a dataloader,
    to one of its workers): item i goes to rank i mod dp_size.

    Every rank of a sequence-parallel group has the same dp rank and so reads the same items,
    in the same order. Use it in `train_dataloader()`:
    `DataParallelShard(stream, self.trainer.strategy.dp_rank, self.trainer.strategy.dp_size)`.
    """

    def __init__(self, iterable: Iterable, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
        self.iterable, self.dp_rank, self.dp_size = iterable, dp_rank, dp_size

    def __iter__(self) -> Iterator:
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        stride = self.dp_size * workers
        offset = self.dp_rank + self.dp_size * worker_id
        for i, item in enumerate(self.iterable):
            if i % stride == offset:
                yield item

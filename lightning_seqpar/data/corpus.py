"""A byte-level corpus built at run time from the Python standard library's `.py` sources.

Nothing is downloaded: every Python installation ships the text. The file list is sorted, and a
file goes to validation when the hash of its path (relative to the stdlib root) says so, so the
split is the same on every machine with the same Python version and doesn't move when a file's
content changes. Different Python versions ship different sources, hence different corpora.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_seqpar.data.splits import TrainValDataModule


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib's `.py` files, sorted; installed packages excluded."""
    return list(_scan(stdlib_root() if root is None else Path(root)))


@functools.lru_cache(maxsize=4)  # walking the tree takes seconds; it doesn't change in a run
def _scan(root: Path) -> tuple[str, ...]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        files.append(rel.as_posix())
    return tuple(sorted(files))


def is_validation_file(rel_path: str, val_percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:4], "big") % 10000
    return bucket < val_percent * 100


def build_corpus(split: str, val_percent: float = 5.0, root: Path | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """The concatenated bytes (`uint8 [N]`) of one split's files, each followed by a blank line."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = stdlib_root() if root is None else Path(root)
    chunks, total = [], 0
    for rel in stdlib_files(root):
        if is_validation_file(rel, val_percent) != (split == "val"):
            continue
        data = (root / rel).read_bytes() + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class StdlibCorpus(Dataset):
    """Non-overlapping windows of `seq_len + 1` bytes: `input_ids` are the first `seq_len`,
    `labels` the last `seq_len` (labels[t] = input_ids[t + 1] on the whole sequence)."""

    def __init__(self, data: torch.Tensor, seq_len: int):
        if data.numel() < seq_len + 1:
            raise ValueError(f"corpus of {data.numel()} bytes is shorter than one window of {seq_len + 1}")
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_len
        window = self.data[start : start + self.seq_len + 1].long()
        return {
            "input_ids": window[:-1],
            "labels": window[1:],
            "position_ids": torch.arange(self.seq_len),
        }


class StdlibCorpusDataModule(TrainValDataModule):
    """Byte-level language modelling on the stdlib sources (vocabulary: 256 bytes).

    `cache_dir`: where the concatenated splits are saved once built (None: rebuild in every
    process, ~1-3 s). `max_train_bytes` / `max_val_bytes` cap the splits (handy in tests).
    """

    vocab_size = 256

    def __init__(
        self,
        seq_len: int = 2048,
        batch_size: int = 1,
        val_percent: float = 5.0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        max_train_bytes: int | None = None,
        max_val_bytes: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: StdlibCorpus | None = None
        self.val_set: StdlibCorpus | None = None

    def _split(self, split: str) -> torch.Tensor:
        hp = self.hparams
        cap = hp.max_train_bytes if split == "train" else hp.max_val_bytes
        if hp.cache_dir is None:
            return build_corpus(split, hp.val_percent, max_bytes=cap)
        tag = hashlib.sha1(f"{stdlib_root()}|{hp.val_percent}|{cap}".encode()).hexdigest()[:12]
        path = Path(hp.cache_dir) / f"stdlib-{split}-{tag}.pt"
        if path.exists():
            return torch.load(path)
        data = build_corpus(split, hp.val_percent, max_bytes=cap)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(data)}")
        torch.save(data, tmp)
        tmp.replace(path)  # atomic, so ranks building at once never read half a file
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = StdlibCorpus(self._split("train"), self.hparams.seq_len)
            self.val_set = StdlibCorpus(self._split("val"), self.hparams.seq_len)

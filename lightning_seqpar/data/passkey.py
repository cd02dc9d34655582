"""Passkey retrieval: a random number hidden early in a long sequence, asked for at its end.

    <filler> the passkey is 48213. <filler> ... what is the passkey? the passkey is 48213
                                                                                   ^^^^^
Only the answer digits carry labels (-100 elsewhere), and the filler holds no digits, so the
answer can come from nowhere but the hidden statement: a model whose attention doesn't reach
it scores chance (10% per digit).

Where the statement goes matters under sequence parallelism. The question sits in the last
piece of the sequence, which the zigzag layout gives to rank 0 together with the *first*
piece, so a key in the first 1/(2N) of the sequence would be on the asking rank and chunk-local
attention could still answer. The default region [L/4, L/2) is on another rank than the
question for every sp_size >= 2 in both layouts (contiguous: rank 0 holds [0, L/N) while the
question is on rank N-1; zigzag: rank 0 holds [0, L/2N) and [L - L/2N, L)).
"""

from __future__ import annotations

import random
import string

import torch
from torch.utils.data import Dataset

from lightning_seqpar.data.splits import TrainValDataModule

FILLER_ALPHABET = string.ascii_lowercase + "      "  # spaces ~ 1 in 5: word-like runs
STATEMENT = " the passkey is {key}. "
QUESTION = " what is the passkey? the passkey is "


class PasskeyDataset(Dataset):
    """`num_samples` sequences of `seq_len` tokens; sample i is a pure function of (split, seed, i).

    key_region: where the statement may start, as fractions of seq_len.
    """

    def __init__(
        self,
        num_samples: int,
        seq_len: int,
        n_digits: int = 5,
        key_region: tuple[float, float] = (0.25, 0.5),
        seed: int = 0,
        split: str = "train",
    ):
        lo, hi = key_region
        self.statement_len = len(STATEMENT.format(key="0" * n_digits))
        self.tail_len = len(QUESTION) + n_digits
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"key_region must satisfy 0 <= lo < hi <= 1, got {key_region}")
        if int(hi * seq_len) - self.statement_len < int(lo * seq_len):
            raise ValueError(f"key_region {key_region} of {seq_len} tokens can't hold the {self.statement_len}-byte statement")
        if int(hi * seq_len) + self.tail_len > seq_len + 1:
            raise ValueError(f"seq_len {seq_len} is too short for the key region and the question")
        self.num_samples, self.seq_len, self.n_digits = num_samples, seq_len, n_digits
        self.key_region, self.seed, self.split = (lo, hi), seed, split

    def __len__(self) -> int:
        return self.num_samples

    def sample_text(self, index: int) -> tuple[bytes, int, str]:
        """(the `seq_len + 1` bytes, where the statement starts, the key)."""
        rng = random.Random(f"passkey/{self.split}/{self.seed}/{index}")
        key = "".join(rng.choice(string.digits) for _ in range(self.n_digits))
        statement = STATEMENT.format(key=key)
        lo, hi = (int(f * self.seq_len) for f in self.key_region)
        start = rng.randint(lo, hi - len(statement))
        tail = QUESTION + key
        filler_len = self.seq_len + 1 - len(statement) - len(tail)
        filler = "".join(rng.choices(FILLER_ALPHABET, k=filler_len))
        text = filler[:start] + statement + filler[start:] + tail
        return text.encode("ascii"), start, key

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        text, _, _ = self.sample_text(index)
        tokens = torch.tensor(list(text), dtype=torch.long)
        labels = torch.full((self.seq_len,), -100, dtype=torch.long)
        # labels[t] = tokens[t + 1]: the answer digits are the last n_digits targets.
        labels[-self.n_digits :] = tokens[-self.n_digits :]
        return {
            "input_ids": tokens[:-1],
            "labels": labels,
            "position_ids": torch.arange(self.seq_len),
        }


class PasskeyDataModule(TrainValDataModule):
    """Train and validation sets of passkey samples (disjoint random streams, same seed)."""

    vocab_size = 256

    def __init__(
        self,
        seq_len: int = 2048,
        batch_size: int = 1,
        n_digits: int = 5,
        key_region: tuple[float, float] = (0.25, 0.5),
        train_samples: int = 10000,
        val_samples: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()

    def _dataset(self, num_samples: int, split: str) -> PasskeyDataset:
        hp = self.hparams
        return PasskeyDataset(num_samples, hp.seq_len, hp.n_digits, tuple(hp.key_region), hp.seed, split)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset(self.hparams.train_samples, "train")
        self.val_set = self._dataset(self.hparams.val_samples, "val")

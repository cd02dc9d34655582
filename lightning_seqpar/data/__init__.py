"""Data for the main job: a byte-level corpus of Python's own sources, and passkey retrieval.

Every batch is a dict of `[B, L]` tensors: `input_ids`, `labels` (already shifted on the whole
sequence, -100 where nothing is predicted) and `position_ids` (`arange(L)`), so a sequence-
parallel strategy can cut all three the same way and the model still sees global positions.
"""

from lightning_seqpar.data.corpus import StdlibCorpus, StdlibCorpusDataModule, stdlib_files
from lightning_seqpar.data.passkey import PasskeyDataModule, PasskeyDataset

__all__ = ["StdlibCorpus", "StdlibCorpusDataModule", "stdlib_files", "PasskeyDataModule", "PasskeyDataset"]

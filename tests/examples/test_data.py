"""Corpus and passkey data: deterministic, labels shifted on the whole sequence, picklable."""

import pickle
import string

import pytest
import torch

from lightning_seqpar.data import PasskeyDataModule, PasskeyDataset, StdlibCorpusDataModule, stdlib_files
from lightning_seqpar.data.corpus import build_corpus, is_validation_file
from lightning_seqpar.layout import sequence_positions


def test_stdlib_files_sorted_and_split_deterministic():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f for f in files)
    val = [f for f in files if is_validation_file(f, 5.0)]
    assert 0.02 < len(val) / len(files) < 0.10
    assert val == [f for f in stdlib_files() if is_validation_file(f, 5.0)]


def test_corpus_deterministic_and_splits_disjoint():
    train = build_corpus("train", max_bytes=200_000)
    assert torch.equal(train, build_corpus("train", max_bytes=200_000))
    val = build_corpus("val", max_bytes=200_000)
    assert train.dtype == torch.uint8 and train.numel() == 200_000
    assert not torch.equal(train[:1000], val[:1000])


def test_corpus_windows_labels_shifted(tmp_path):
    dm = StdlibCorpusDataModule(seq_len=128, batch_size=2, max_train_bytes=50_000, max_val_bytes=20_000,
                                cache_dir=str(tmp_path))
    dm = pickle.loads(pickle.dumps(dm))  # picklable before setup (spawn)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 128)
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert torch.equal(batch["position_ids"], torch.arange(128).expand(2, 128))
    # Consecutive windows: the last label of one is the first input of the next.
    ds = dm.train_set
    assert ds[0]["labels"][-1] == ds[1]["input_ids"][0]
    # The cache gives back the same bytes, and the set survives pickling after setup.
    again = StdlibCorpusDataModule(seq_len=128, max_train_bytes=50_000, max_val_bytes=20_000, cache_dir=str(tmp_path))
    again.setup("fit")
    assert torch.equal(again.train_set.data, ds.data) and len(list(tmp_path.iterdir())) == 2
    assert torch.equal(pickle.loads(pickle.dumps(dm)).val_set[3]["input_ids"], dm.val_set[3]["input_ids"])


def test_passkey_sample_structure():
    ds = PasskeyDataset(num_samples=8, seq_len=1024, n_digits=5, seed=3)
    for i in range(8):
        text, start, key = ds.sample_text(i)
        sample = ds[i]
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.shape == labels.shape == (1024,) and len(text) == 1025
        assert 256 <= start and start + ds.statement_len <= 512  # key in [L/4, L/2)
        assert text[start:].startswith(f" the passkey is {key}. ".encode())
        assert text.endswith(f"what is the passkey? the passkey is {key}".encode())
        # Only the answer digits are labelled, and labels[t] = next token of the full sequence.
        labelled = (labels != -100).nonzero().flatten()
        assert labelled.tolist() == list(range(1024 - 5, 1024))
        assert bytes(labels[labelled].tolist()).decode() == key
        assert torch.equal(labels[labelled], torch.tensor(list(text[1:]))[labelled])
        # The filler holds no digits: the answer exists only in the hidden statement.
        digits = [j for j, b in enumerate(text) if chr(b) in string.digits]
        assert len(digits) == 10
    assert len({ds.sample_text(i)[2] for i in range(8)}) == 8


def test_passkey_deterministic_and_splits_differ():
    a, b = PasskeyDataset(4, 512, seed=0), PasskeyDataset(4, 512, seed=0)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(4))
    assert not torch.equal(PasskeyDataset(4, 512, seed=1)[0]["input_ids"], a[0]["input_ids"])
    assert not torch.equal(PasskeyDataset(4, 512, split="val")[0]["input_ids"], a[0]["input_ids"])
    dm = pickle.loads(pickle.dumps(PasskeyDataModule(seq_len=512, batch_size=2, val_samples=4)))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (2, 512) and (batch["labels"] != -100).sum() == 10


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("sp_size", [2, 4])
def test_passkey_key_and_question_on_different_ranks(layout, sp_size):
    """Chunk-local attention can't answer: no rank holds both the key and the answer."""
    seq_len = 2048
    ds = PasskeyDataset(16, seq_len)
    owner = torch.empty(seq_len, dtype=torch.long)
    for rank in range(sp_size):
        owner[sequence_positions(seq_len, rank, sp_size, layout)] = rank
    for i in range(16):
        _, start, _ = ds.sample_text(i)
        key_ranks = set(owner[start : start + ds.statement_len].tolist())
        answer_ranks = set(owner[-ds.tail_len :].tolist())
        assert not key_ranks & answer_ranks


def test_passkey_rejects_impossible_regions():
    with pytest.raises(ValueError, match="key_region"):
        PasskeyDataset(1, 1024, key_region=(0.5, 0.25))
    with pytest.raises(ValueError, match="too short"):
        PasskeyDataset(1, 1024, key_region=(0.5, 1.0))

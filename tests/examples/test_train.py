"""`examples/train.py` end to end, 2 CPU processes with sp_size 2: the files a run leaves, its
summary, and that Lightning's re-launched ranks create no directories of their own."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "train.py"
QUICK = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1", "data.seq_len=256", "data.max_train_bytes=60000",
    "data.max_val_bytes=20000", "model.net.n_layer=1",
]


def strategy_available() -> bool:
    try:
        from lightning_seqpar import SeqParStrategy  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not strategy_available(), reason="lightning_seqpar.SeqParStrategy not there yet")


def run(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(TRAIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_multirun_two_jobs_two_ranks_each(tmp_path):
    """A 2-job sweep with the default strategy (2 processes, sp_size 2). Each job's ranks share
    its directory; the ranks Lightning re-launches run that one job, not the sweep again; the
    second job starts its ranks too; each job leaves config, checkpoints, CSV and TensorBoard
    logs and prints its summary. (One sweep covers the plain run's path as well: a job is a run.)"""
    out = run(tmp_path, "-m", *QUICK, "model.lr=1e-3,2e-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]  # no outputs/ from a rank
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "rank1.log").exists()  # rank 1 ran this job, in this directory
        assert (job / ".hydra" / "config.yaml").exists()
        assert (job / "checkpoints" / "last.ckpt").exists()
        assert list((job / "tensorboard").rglob("events.out.tfevents.*"))
        with open(next((job / "csv").rglob("metrics.csv"))) as f:
            rows = list(csv.DictReader(f))
        assert any(r.get("train/loss") for r in rows) and any(r.get("val/ppl") for r in rows)
        assert f"outputs: {job}" in out
    assert out.count("SeqParStrategy, 2 process(es), 2 optimizer steps") == 2
    assert out.count("tokens/s") == 2 and out.count("perplexity") == 2

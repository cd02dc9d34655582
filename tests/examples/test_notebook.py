"""`examples/finetune.ipynb` end to end on the CPU, as a fresh machine would run it: no
checkpoint in its outputs directory, so it first runs the main job for a few steps, then
fine-tunes that checkpoint with `seqpar_notebook` (2 forked processes, sp_size 2) and plots.
The last cell's numbers must show a real fine-tune: 16 steps, and validation perplexity (same
batches) lower after 16 steps than after 8."""

import json
import math
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "finetune.ipynb"


def test_finetune_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_OUTPUTS", str(tmp_path))
    for var in ("FINETUNE_CHECKPOINT", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    assert (tmp_path / "finetune" / "pretrain" / "checkpoints" / "last.ckpt").exists()  # made by the main job
    result = json.loads((tmp_path / "finetune" / "finetune_result.json").read_text())
    assert result["steps"] == 16
    mid, end = result["val_ppl"]
    assert math.isfinite(mid) and 1 < end < mid, result
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the loss curve, inline

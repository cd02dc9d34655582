"""Every registered name launches real processes and trains: "seqpar" (the script launcher:
re-runs the script per rank), "seqpar_spawn" (returns the trained weights to the main process),
"seqpar_notebook" (fork, in a simulated interactive session). Each run's parameters, as the
main process holds them afterwards, equal one-process training within 1e-5 (relative
Frobenius error per tensor)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.strategy.harness import assert_same_parameters, quiet_trainer, snapshot
from tests.strategy.models import build

REPO = Path(__file__).resolve().parents[2]


def reference_parameters():
    model = build("lm", True, 4, 8, 4)
    quiet_trainer(devices=1, max_epochs=1).fit(model)
    return snapshot(model)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["seqpar", "seqpar_spawn", "seqpar_notebook"])
def test_launcher_trains_like_one_process(tmp_path, name):
    out = tmp_path / "params.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    script = str(REPO / "tests" / "strategy" / "launch_script.py")
    run = subprocess.run(
        [sys.executable, script, name, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "SeqParStrategy: world 2 = dp 1 × sp 2" in run.stderr + run.stdout
    assert_same_parameters(torch.load(out), reference_parameters())

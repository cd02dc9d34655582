"""Faults under the script launcher (strategy "seqpar": rank 1 is a child process of rank 0),
on 2 CPU processes running tests/reliability/fault_script.py, each bounded by a subprocess
timeout. After each, no process of the job is left (checked through /proc by the pids the
ranks wrote).

- one rank raises in training_step: the job ends, and its output holds the original error;
- one rank hangs (alive, never reaching the next collective): the other rank's collective
  times out after the strategy's `timeout=` (30 s here), then the launching rank ends the hung
  one, and the job ends with the timeout error and the strategy's note on where to look;
- one rank is SIGKILLed in epoch 2: the job ends; resuming from the epoch-1 checkpoint
  (last.ckpt) gives exactly (torch.equal) the parameters of the uninterrupted 3-epoch run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "reliability" / "fault_script.py"
JOB_TIMEOUT_S = 150  # the subprocess bound; a job that needs it has hung
ENDS_WITHIN_S = 120  # start-up (two imports of torch + Lightning on 2 cores) + fault + 30 s timeout


def run_job(mode: str, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(var, None)
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out)], cwd=out, env=env, capture_output=True, text=True,
        timeout=JOB_TIMEOUT_S,
    )
    return run, time.monotonic() - start


def assert_no_process_left(out: Path) -> None:
    pids = [int(p.read_text()) for p in out.glob("pid.*")]
    assert len(pids) == 2, pids
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "fault_script" in _cmdline(pid)]
    assert not left, f"processes left running: {left}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.timeout(200)
def test_exception_on_one_rank_ends_the_job_with_the_original_error(tmp_path):
    run, elapsed = run_job("raise", tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "RuntimeError: original error: rank 1 failed at step 4" in output, output[-3000:]
    assert elapsed < ENDS_WITHIN_S, elapsed
    assert_no_process_left(tmp_path)


@pytest.mark.timeout(200)
def test_hung_rank_ends_at_the_collective_timeout(tmp_path):
    run, elapsed = run_job("hang", tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Timed out waiting 30000ms" in output, output[-3000:]
    assert "another rank most likely failed or stopped first" in output
    assert elapsed < ENDS_WITHIN_S, elapsed
    assert_no_process_left(tmp_path)


@pytest.mark.timeout(400)
def test_killed_rank_ends_the_job_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted, _ = run_job("train", tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    crashed = tmp_path / "crashed"
    killed, elapsed = run_job("kill", crashed)
    assert killed.returncode != 0
    assert elapsed < ENDS_WITHIN_S, elapsed
    assert_no_process_left(crashed)
    assert (crashed / "last.ckpt").exists() and not (crashed / "params.pt").exists()
    assert torch.load(crashed / "last.ckpt", weights_only=False)["global_step"] == 3  # epoch 1 only

    resumed, _ = run_job("resume", crashed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "uninterrupted" / "params.pt")
    got = torch.load(crashed / "params.pt")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

"""Faults under the script launcher (strategy "seqpar": rank 1 is a child process of rank 0),
on 2 CPU processes running tests/reliability/fault_script.py, each bounded by a subprocess
timeout. After each, no process of the job is left, dataloader workers included (checked
through /proc by the pids they wrote).

- one rank raises in training_step: the job ends, and its output holds the original error;
- one rank hangs (alive, never reaching the next collective): the other rank's collective
  times out after the strategy's `timeout=` (30 s here), then the launching rank ends the hung
  one, and the job ends with the timeout error and the strategy's note on where to look;
- rank 1 is SIGKILLed in epoch 2: the job ends; resuming from the epoch-1 checkpoint, and
  from the step-5 checkpoint in the middle of epoch 2 (two steps before the kill), gives exactly
  (torch.equal) the parameters of the uninterrupted 3-epoch run: data order and position, every
  rank's random state (dropout), with a dataloader worker per rank;
- rank 0, the launching process, is SIGKILLed: rank 1 ends at once, also when it is busy far
  from any collective (where no collective timeout could reach it).
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
# A killed launcher takes rank 1 with it at once: start-up and 7 steps, well under the 30 s timeout.
LAUNCHER_KILL_ENDS_WITHIN_S = 60


def run_job(mode: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the script; returns when every process holding its output pipes (rank 1 too) is gone."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(var, None)
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out), *args], cwd=out, env=env, capture_output=True,
        text=True, timeout=JOB_TIMEOUT_S,
    )
    return run, time.monotonic() - start


def assert_no_process_left(out: Path) -> None:
    ranks = [int(p.read_text()) for p in out.glob("pid.*")]
    assert len(ranks) == 2, ranks
    pids = ranks + [int(p.read_text()) for p in out.glob("worker.*")]
    # A dataloader worker whose rank was killed notices it within 5 s (torch's worker watchdog).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    left = [pid for pid in pids if _running(pid)]
    assert not left, f"processes left running: {left}"


def _running(pid: int) -> bool:
    """Alive and still this job's (not a zombie nor a reused pid)."""
    try:
        return "fault_script" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def assert_same_parameters(got_path: Path, expected_path: Path) -> None:
    expected, got = torch.load(expected_path), torch.load(got_path)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run, _ = run_job("train", out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def assert_ended_in_failure(run, elapsed: float, out: Path, within: float = ENDS_WITHIN_S, returncode: int | None = None) -> str:
    """The job failed (with `returncode`, if given) within `within` seconds and left no process
    behind; returns its output."""
    if returncode is None:
        assert run.returncode != 0
    else:
        assert run.returncode == returncode
    assert elapsed < within, elapsed
    assert_no_process_left(out)
    return run.stdout + run.stderr


@pytest.fixture(scope="module")
def rank1_killed(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    out = tmp_path_factory.mktemp("rank1_killed")
    run, elapsed = run_job("kill", out)
    return out, run, elapsed


@pytest.mark.timeout(200)
def test_exception_on_one_rank_ends_the_job_with_the_original_error(tmp_path):
    output = assert_ended_in_failure(*run_job("raise", tmp_path), tmp_path)
    assert "RuntimeError: original error: rank 1 failed at step 7" in output, output[-3000:]


@pytest.mark.timeout(200)
def test_hung_rank_ends_at_the_collective_timeout(tmp_path):
    output = assert_ended_in_failure(*run_job("hang", tmp_path), tmp_path)
    assert "Timed out waiting 30000ms" in output, output[-3000:]
    assert "another rank most likely failed or stopped first" in output


@pytest.mark.timeout(200)
def test_killed_rank_ends_the_job_with_its_checkpoints_written(rank1_killed):
    out, run, elapsed = rank1_killed
    assert_ended_in_failure(run, elapsed, out)
    assert not (out / "params.pt").exists()
    assert torch.load(out / "epochs" / "last.ckpt", weights_only=False)["global_step"] == 4  # epoch 1
    assert torch.load(out / "steps" / "last.ckpt", weights_only=False)["global_step"] == 5  # 1 batch into epoch 2


@pytest.mark.timeout(400)
@pytest.mark.parametrize("checkpoint", ["epochs", "steps"], ids=["end-of-epoch", "mid-epoch"])
def test_resume_after_a_killed_rank_reproduces_the_uninterrupted_run(tmp_path, uninterrupted, rank1_killed, checkpoint):
    crashed, _, _ = rank1_killed
    resumed, _ = run_job("resume", tmp_path, str(crashed / checkpoint / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dataloader is not resumable" not in resumed.stderr
    assert_same_parameters(tmp_path / "params.pt", uninterrupted / "params.pt")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["kill_launcher", "kill_launcher_busy"], ids=["in-step", "rank1-busy"])
def test_killed_launcher_ends_the_job_at_once(tmp_path, mode):
    run, elapsed = run_job(mode, tmp_path)
    assert_ended_in_failure(run, elapsed, tmp_path, within=LAUNCHER_KILL_ENDS_WITHIN_S, returncode=-9)

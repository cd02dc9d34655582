"""`benchmarks/multi_gpu.py` is run on lent GPU machines, rarely; this keeps its plumbing honest
between runs: on 2 CPU processes (gloo, `--smoke`: tiny model and shapes), its correctness part
must pass every case (with `--cuda-graphs`, the ring's three calls per case), the scaling and
checks parts must produce their rows, eager and graphed, and the capacity part (longest sequence with SP and with tensor
parallelism, under a fixed token budget on CPU) must find sequence parallelism's longest
sequence N times the single process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_multi_gpu_benchmark_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "benchmarks" / "multi_gpu.py"), "--device", "cpu", "--smoke", "--timeout", "60",
         "--parts", "correctness", "scaling", "checks", "capacity", "--cuda-graphs", "--out-dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    correctness = json.loads((tmp_path / "multi_gpu_correctness.json").read_text())
    assert correctness["failures"] == 0 and len(correctness["rows"]) == 48  # ring, allgather, rsa x 16
    assert {r["algorithm"] for r in correctness["rows"]} == {"ring", "allgather", "rsa"}
    assert correctness["launcher"] == "torchrun --nproc-per-node=2"
    scaling = json.loads((tmp_path / "multi_gpu_scaling.json").read_text())["rows"]
    assert {r.get("algorithm") for r in scaling if r["kind"] == "attention" and r["world_size"] == 2} == {"ring", "allgather"}
    # --cuda-graphs adds graphed rows beside the eager ones (on CPU the calls stay eager)
    assert {(r["kind"], r["cuda_graphs"]) for r in scaling if r["world_size"] == 2} == {
        ("model", False), ("model", True), ("attention", False), ("attention", True)}
    checks = json.loads((tmp_path / "multi_gpu_checks.json").read_text())["rows"]
    assert len(checks) == 4 and all(r["off_ms"] > 0 and r["group_ms"] > 0 and r["twin_ms"] > 0 for r in checks)
    capacity = json.loads((tmp_path / "multi_gpu_capacity.json").read_text())
    longest = {r["world_size"]: r["seq_len"] for r in capacity["rows"] if r["kind"] == "longest"}
    assert longest[2] == 2 * longest[1] > 0
    versus = next(r for r in capacity["rows"] if r["kind"] == "sp_vs_tp")
    assert versus["tp_longest"] > 0 and versus["sp_max_batch"] >= 1 and versus["tp_max_batch"] >= 1

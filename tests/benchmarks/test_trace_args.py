"""`benchmarks/trace.py` needs a GPU to trace; its arguments are checked before that, here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_calls_below_one_are_refused_before_anything_runs():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trace.py"), "--calls", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--calls must be at least 1" in run.stderr

"""A pool of gloo processes that stays up for a test module, so hundreds of multi-rank cases cost
one process start-up. Every task and every collective runs under a timeout: a hang fails the
test and kills the pool instead of stalling the suite."""

from __future__ import annotations

import os
import queue
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp

# Collectives give up after this long; tasks are given a little longer, so a hang surfaces as
# the collective's own timeout error where gloo raises one.
COLLECTIVE_TIMEOUT_S = 60


@dataclass
class Outcome:
    """What one rank's task ended with: `value`, or the exception it raised."""

    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    trace: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put(Outcome(rank, value=fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - reported to the test, which decides
            results.put(Outcome(rank, error_type=type(exc).__name__, error=str(exc), trace=traceback.format_exc()))
    dist.destroy_process_group()


class ProcessPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.broken = False

    def run(self, fn: Callable, *args, timeout: float = COLLECTIVE_TIMEOUT_S + 30, **kwargs) -> list[Outcome]:
        """Run `fn(*args, **kwargs)` on every rank; return each rank's outcome, in rank order."""
        if self.broken:
            raise RuntimeError("the process pool was killed by an earlier timeout")
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        outcomes: dict[int, Outcome] = {}
        try:
            while len(outcomes) < self.world_size:
                outcome = self._results.get(timeout=timeout)
                outcomes[outcome.rank] = outcome
        except queue.Empty:
            self.close(kill=True)
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (a hang)") from None
        return [outcomes[r] for r in range(self.world_size)]

    def run_ok(self, fn: Callable, *args, **kwargs) -> list[Any]:
        """Like `run`, but any rank's exception fails the test with that rank's traceback."""
        outcomes = self.run(fn, *args, **kwargs)
        failed = [o for o in outcomes if o.error_type is not None]
        if failed:
            raise AssertionError("\n".join(f"rank {o.rank} raised:\n{o.trace}" for o in failed))
        return [o.value for o in outcomes]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.broken = True

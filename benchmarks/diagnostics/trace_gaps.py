"""Where the compute of a traced ring waits, and on what.

Reads a Chrome trace written by `benchmarks/trace.py` and lists the compute's device work in
order (kernels, memsets, memcpys; everything but the transfers, on whichever streams a replayed
CUDA graph spreads it over) with the idle time before each item. Every gap is
put down to one of two causes, from the CPU-side launch call of the item after it (matched by
the profiler's correlation id):

- "cpu": the launch call ended after the previous item had finished, so the GPU ran out of
  queued work: the host was too slow to keep it fed;
- "wait": the item was already queued and still started late: it waited on another stream
  (a transfer's event) or on a device-side dependency.

    python benchmarks/diagnostics/trace_gaps.py benchmarks/results/trace_ring_8192.json

Runs anywhere (it only reads the JSON); the traces come from a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.trace import device_work  # noqa: E402


def short_name(name: str) -> str:
    """A kernel's family, not its template arguments."""
    for marker, label in (("fprop", "cudnn fwd"), ("bprop", "cudnn bwd"), ("dot_do_o", "cudnn dO.O"),
                          ("convert_dq", "cudnn dQ cast"), ("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "fmha"), ("fold_kernel", "fold"),
                          ("elementwise_kernel", "elementwise"), ("CatArrayBatchedCopy", "stack/cat"),
                          ("reduce_kernel", "reduce"), ("Memset", "memset"), ("Memcpy", "memcpy")):
        if marker in name:
            return label
    return name.split("(")[0][-40:]


def compute_timeline(trace: dict) -> tuple[list[dict], float]:
    """The compute work's items in start order (`benchmarks.trace.device_work`: all but the
    transfers, NCCL's kernels or peer copies, where there are any, else the busiest stream's),
    each with the time since the compute before it last ended and that gap's cause, and the
    transfers' summed busy time."""
    events = trace["traceEvents"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    compute, transfers = device_work(events)
    timeline, previous_end = [], None
    for e in sorted(compute, key=lambda e: e["ts"]):
        launch = launches.get(e["args"].get("correlation"))
        gap = 0.0 if previous_end is None else max(0.0, e["ts"] - previous_end)
        launched = None if launch is None else launch["ts"] + launch["dur"]
        cause = ""
        if gap > 0 and launched is not None:
            cause = "cpu" if launched > previous_end else "wait"
        timeline.append({"name": short_name(e["name"]), "start": e["ts"], "dur": e["dur"], "gap": gap, "cause": cause})
        previous_end = e["ts"] + e["dur"] if previous_end is None else max(previous_end, e["ts"] + e["dur"])
    return timeline, sum(e["dur"] for e in transfers)


def summarize(path: Path, show: int) -> None:
    timeline, others = compute_timeline(json.loads(path.read_text()))
    span = timeline[-1]["start"] + timeline[-1]["dur"] - timeline[0]["start"]
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for item in timeline:
        by_name[item["name"]][0] += 1
        by_name[item["name"]][1] += item["dur"]
    idle = defaultdict(float)
    for item in timeline:
        idle[item["cause"] or "unknown"] += item["gap"]
    print(f"## {path.name}: compute span {span / 1e3:.3f} ms, busy {sum(t['dur'] for t in timeline) / 1e3:.3f} ms, "
          f"idle {sum(idle.values()) / 1e3:.3f} ms (" + ", ".join(f"{k} {v / 1e3:.3f}" for k, v in sorted(idle.items())) +
          f"); transfers busy {others / 1e3:.3f} ms")
    for name, (count, total) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"   {name:>14} x{count:<4} {total / 1e3:8.3f} ms")
    print("   largest gaps (us before the item, its cause):")
    for item in sorted(timeline, key=lambda t: -t["gap"])[:show]:
        print(f"   {item['gap']:8.1f} us {item['cause']:>5} before {item['name']} "
              f"at +{(item['start'] - timeline[0]['start']) / 1e3:.3f} ms ({item['dur']:.1f} us)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", type=Path, nargs="+")
    parser.add_argument("--show", type=int, default=10, help="how many of the largest gaps to list")
    a = parser.parse_args()
    for path in a.traces:
        summarize(path, a.show)


if __name__ == "__main__":
    main()

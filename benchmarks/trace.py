"""A torch.profiler trace of one simulated rank of the ring (forward + backward), and how much
of the transfer time is hidden behind compute.

The simulated transfer (benchmarks/simulated_ring.py) runs on its own CUDA stream, as NCCL's
kernels do; the trace shows whether the next block's transfer overlaps the current block's
attention kernel. Overlap = time during which a transfer kernel and a compute kernel run at
once, divided by the transfer kernels' total time.

    python benchmarks/trace.py --tokens 8192
    python benchmarks/trace.py --tokens 4096 --causal --forward-only --cuda-graphs   # a replay
    python benchmarks/trace.py --tokens 4096 --causal --forward-only --cuda-graphs --calls 4   # and between replays

Writes benchmarks/results/trace_ring_<tokens>.json (Chrome trace, open in Perfetto) and
benchmarks/results/trace_<device>.json (the summary).

With --cuda-graphs the process used to hang at exit after writing both files (torch 2.11, H100s,
2026-11-26): its captured graphs still held the simulated transfers' NCCL work when that
backend shut down. `simulated_ring` now drops them first, and it exits (H100: 26 s for a 4K
forward+backward trace, 14 s for two replayed forwards).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, apply_ring_args, card, one_shape_parser, write_result  # noqa: E402
from benchmarks.simulated_ring import every_rank_holds_mine, fake_group  # noqa: E402
from lightning_seqpar.ops import ring_attention, set_cuda_graphs  # noqa: E402


def _union(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _intersection(a, b):
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _is_transfer(event: dict) -> bool:
    """NCCL's kernels, and the peer copies of the simulated "peer" transfer."""
    return "nccl" in event["name"].lower() or "PtoP" in event["name"]


def device_work(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """A trace's device items (kernels, memcpys, memsets), split into (compute, transfers).

    NCCL's kernels (and peer copies) are the transfers wherever they run: a replayed CUDA graph
    runs its branches on streams of its own, so one pass's compute is spread over several stream
    ids, and NCCL's kernels may share one of them. Without either (the simulated memcpy and
    copy-kernel transfers, which are never captured) the busiest stream is the compute stream and the
    others carry the transfers."""
    items = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    if any(_is_transfer(e) for e in items):
        return [e for e in items if not _is_transfer(e)], [e for e in items if _is_transfer(e)]
    by_stream: dict = {}
    for e in items:
        by_stream.setdefault(e["args"].get("stream", e.get("tid")), []).append(e)
    if not by_stream:
        return [], []
    compute = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s]))
    return by_stream.pop(compute), [e for rest in by_stream.values() for e in rest]


def overlap_summary(trace_path: Path) -> dict:
    return overlap_summary_of(json.loads(trace_path.read_text())["traceEvents"])


def overlap_summary_of(events: list[dict]) -> dict:
    """Compute busy time and span, transfer time, and how much of it ran beside compute."""
    compute, transfers = device_work(events)
    compute_iv = _union([(e["ts"], e["ts"] + e["dur"]) for e in compute])
    # From the first compute item to the last: what is not busy in it, the compute waited.
    span = compute_iv[-1][1] - compute_iv[0][0]
    transfer_iv = _union([(e["ts"], e["ts"] + e["dur"]) for e in transfers])
    transfer = sum(end - start for start, end in transfer_iv)
    hidden = _intersection(transfer_iv, compute_iv)
    busy = sum(end - start for start, end in compute_iv)
    streams = {e["args"].get("stream", e.get("tid")) for e in compute + transfers}
    return {"compute_stream_us": busy, "compute_span_us": span, "transfer_us": transfer, "hidden_us": hidden,
            "overlap": hidden / transfer if transfer else None, "streams": len(streams)}


def main():
    parser = one_shape_parser(__doc__, tokens=8192, head_dim=128)
    parser.add_argument("--forward-only", action="store_true", help="trace the forward alone")
    parser.add_argument("--trace-out", type=Path, help="where the Chrome trace goes (default: results/trace_ring_<tokens>.json)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="trace a replay from CUDA graphs (set_cuda_graphs; the warm-up steps run eagerly, then capture)")
    parser.add_argument("--calls", type=int, default=1,
                        help="steps traced back to back, with no sync between them: what lies between two calls")
    a = parser.parse_args()
    if a.calls < 1:
        parser.error("--calls must be at least 1")
    apply_ring_args(a)
    set_cuda_graphs(a.cuda_graphs)
    if not torch.cuda.is_available():
        raise SystemExit("the trace needs a CUDA device (streams are what it shows)")
    q, k, v = (torch.randn(1, a.heads, a.tokens, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    with fake_group(0, a.world_size), every_rank_holds_mine():
        def step():
            out = ring_attention(q, k, v, causal=a.causal, layout="zigzag")
            if not a.forward_only:
                torch.autograd.grad(out, (q, k, v), grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(a.calls):
                step()
            torch.cuda.synchronize()
    trace = a.trace_out or RESULTS / f"trace_ring_{a.tokens}.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    summary = overlap_summary(trace)
    print(f"# {card('cuda')} | torch {torch.__version__} | {a.heads} x {a.head_dim} bf16 | N = {a.world_size} | "
          f"{a.tokens} tokens per rank | {'causal zigzag' if a.causal else 'non-causal'} | "
          f"{'forward' if a.forward_only else 'forward + backward'}{' | replayed from CUDA graphs' if a.cuda_graphs else ''}"
          f"{f' | {a.calls} calls back to back' if a.calls > 1 else ''}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    print(f"compute stream busy {summary['compute_stream_us'] / 1e3:.2f} ms of its {summary['compute_span_us'] / 1e3:.2f} ms "
          f"from first kernel to last; transfers {summary['transfer_us'] / 1e3:.2f} ms, "
          f"of which {summary['hidden_us'] / 1e3:.2f} ms ({100 * (summary['overlap'] or 0):.0f}%) ran beside compute")
    write_result("trace", "cuda", vars(a), [summary], trace=trace.name)


if __name__ == "__main__":
    main()

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

With --cuda-graphs, on torch 2.11 and H100s, the process has not exited after writing both
files (three runs, 2026-11-26): run it under `timeout`. The cause was not found.
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


def overlap_summary(trace_path: Path) -> dict:
    events = json.loads(trace_path.read_text())["traceEvents"]
    # Device-side work: kernels, and copies (a simulated transfer is NCCL's kernel, a copy kernel or a memcpy).
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy") and "dur" in e]
    by_stream: dict[int, list] = {}
    for e in kernels:
        by_stream.setdefault(e["args"].get("stream", e.get("tid")), []).append((e["ts"], e["ts"] + e["dur"]))
    # The compute stream is the one with the most kernel time; the others carry the transfers.
    busy = {s: sum(end - start for start, end in _union(iv)) for s, iv in by_stream.items()}
    compute = max(busy, key=busy.get)
    compute_iv = _union(by_stream[compute])
    # From the compute stream's first kernel to its last: what is not busy in it, it waited.
    span = compute_iv[-1][1] - compute_iv[0][0]
    transfer_iv = _union([iv for s, ivs in by_stream.items() if s != compute for iv in ivs])
    transfer = sum(end - start for start, end in transfer_iv)
    hidden = _intersection(transfer_iv, compute_iv)
    return {"compute_stream_us": busy[compute], "compute_span_us": span, "transfer_us": transfer, "hidden_us": hidden,
            "overlap": hidden / transfer if transfer else None, "streams": len(by_stream)}


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

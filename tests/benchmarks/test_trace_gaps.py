"""`benchmarks/diagnostics/trace_gaps.py` decides, from a profiler trace, whether the compute
stream waited on the host or on another stream; BENCHMARKS.md's host-bound finding rests on
it. A hand-made trace whose answer is known keeps that attribution honest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("trace_gaps", REPO / "benchmarks" / "diagnostics" / "trace_gaps.py")
trace_gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_gaps)
trace_module = importlib.import_module("benchmarks.trace")


def device(name, ts, dur, correlation, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, "correlation": correlation}}


def launch(ts, dur, correlation):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_gaps_are_put_down_to_the_host_or_to_a_wait():
    trace = {"traceEvents": [
        launch(0, 2, 1), device("cudnn_generated_fprop", 5, 100, 1),
        # Launched long before the first kernel ended, yet started late: it waited on a stream.
        launch(3, 2, 2), device("fold_kernel", 150, 20, 2),
        # Launched only after the previous kernel had ended: the host was late.
        launch(200, 5, 3), device("cudnn_generated_bprop", 210, 100, 3),
        # The transfer stream's copy, and a launch the trace lost (no cause can be given).
        device("Memcpy DtoD", 110, 35, 4, stream=9, cat="gpu_memcpy"),
        device("elementwise_kernel<add>", 330, 10, 99),
    ]}
    timeline, others = trace_gaps.compute_timeline(trace)
    assert [(t["name"], t["gap"], t["cause"]) for t in timeline] == [
        ("cudnn fwd", 0.0, ""), ("fold", 45.0, "wait"), ("cudnn bwd", 40.0, "cpu"), ("elementwise", 20.0, ""),
    ]
    assert others == 35


def test_the_busiest_stream_is_the_compute_stream():
    trace = {"traceEvents": [
        launch(0, 1, 1), device("copy", 0, 10, 1, stream=3),
        launch(0, 1, 2), device("cudnn_generated_fprop", 0, 50, 2, stream=8),
    ]}
    timeline, others = trace_gaps.compute_timeline(trace)
    assert [t["name"] for t in timeline] == ["cudnn fwd"] and others == 10


def test_a_replayed_graph_spreads_compute_over_streams_and_nccl_is_the_transfer():
    """A replayed CUDA graph runs its branches on streams of its own, and NCCL's kernels may
    share one of them: the compute is every item but NCCL's, whatever its stream. (Read by
    stream, this trace's busiest stream would be NCCL's, and the backward call half of the
    compute would be missed.)"""
    trace = {"traceEvents": [
        launch(0, 5, 1),  # one cudaGraphLaunch: every item of the replay has its correlation
        device("Memcpy DtoD", 10, 20, 1, stream=7, cat="gpu_memcpy"),
        device("ncclDevKernel_SendRecv", 30, 200, 1, stream=7),
        device("cudnn_generated_fprop", 35, 100, 1, stream=185),
        device("cudnn_generated_bprop", 150, 60, 1, stream=204),
        device("ncclDevKernel_SendRecv", 240, 100, 1, stream=202),
        device("fold_kernel", 260, 30, 1, stream=7),
    ]}
    timeline, others = trace_gaps.compute_timeline(trace)
    assert [(t["name"], t["gap"], t["cause"]) for t in timeline] == [
        ("memcpy", 0.0, ""), ("cudnn fwd", 5.0, "wait"), ("cudnn bwd", 15.0, "wait"), ("fold", 50.0, "wait"),
    ]
    assert others == 300
    summary = trace_module.overlap_summary_of(trace["traceEvents"])
    assert summary["compute_stream_us"] == 20 + 100 + 60 + 30
    assert summary["compute_span_us"] == 290 - 10
    assert summary["transfer_us"] == 300
    # NCCL ran 30-340; compute 10-30, 35-135, 150-210, 260-290.
    assert summary["hidden_us"] == 100 + 60 + 30

"""Timing, card naming and result files shared by the benchmarks."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.simulated_ring import COMM_PRIORITIES, DEFAULT_TRANSFER, TRANSFERS, set_transfer
from lightning_seqpar.ops import _merge, backward_blocks_per_call, set_backward_blocks_per_call

RESULTS = Path(__file__).parent / "results"

# How `time_ms` times CUDA work:
# - "isolated": the device is drained before every rep, so each rep also pays the host's time
#   from the call to its first kernel (an op of many launches pays more of it than one fused call);
# - "steady": reps are queued back to back and the device is drained once at the end, as in
#   a training loop where the host runs ahead of the device (torch.utils.benchmark and
#   triton.testing.do_bench time this way). A rep still shows any time the device waits for
#   the host: an op whose launches take longer than its kernels is as slow here as in training.
# Steady is the default, as the way a training step runs the op. On an H200 isolated reps of the
# ring read up to 0.08 lower, and host-bound rows move either way (BENCHMARKS.md, section 1).
TIMINGS = ("isolated", "steady")
_timing = "steady"


def set_timing(mode: str) -> None:
    global _timing
    if mode not in TIMINGS:
        raise ValueError(f"unknown timing {mode!r}: use one of {TIMINGS}")
    _timing = mode


def attention_parser(doc: str, world_size: int = 8, heads: int = 32) -> argparse.ArgumentParser:
    """The arguments every simulated-ring attention benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world-size", type=int, default=world_size)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--timing", choices=TIMINGS, default=_timing, help="how CUDA reps are timed (benchmarks/common.py)")
    add_ring_arguments(parser)
    return parser


def one_shape_parser(doc: str, tokens: int, head_dim: int) -> argparse.ArgumentParser:
    """The arguments of a script that runs one simulated ring rank on one shape (CUDA only)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens per rank")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=head_dim)
    parser.add_argument("--causal", action="store_true", help="causal zigzag (default: non-causal)")
    add_ring_arguments(parser)
    return parser


def add_ring_arguments(parser: argparse.ArgumentParser) -> None:
    """How the simulated ring moves its blocks, and how its backward groups and folds them."""
    parser.add_argument("--transfer", choices=TRANSFERS, default=DEFAULT_TRANSFER,
                        help="how a simulated ring transfer copies on CUDA (benchmarks/simulated_ring.py)")
    parser.add_argument("--comm-priority", choices=COMM_PRIORITIES, default="normal",
                        help="priority of NCCL's stream for the simulated transfers (results/transfer_schedule_trial.txt)")
    parser.add_argument("--backward-blocks-per-call", type=int, default=backward_blocks_per_call(),
                        help="visiting blocks per block call in the ring's backward (set_backward_blocks_per_call)")
    parser.add_argument("--gradient-parts-per-fold", type=int, default=_merge.GRADIENT_PARTS_PER_FOLD,
                        help="gradient partials that wait for one fold on CUDA (_merge.set_gradient_parts_per_fold)")


def apply_ring_args(args: argparse.Namespace) -> None:
    """Set what `add_ring_arguments`' options chose."""
    set_transfer(args.transfer, args.comm_priority)
    set_backward_blocks_per_call(args.backward_blocks_per_call)
    _merge.set_gradient_parts_per_fold(args.gradient_parts_per_fold)


def parse_attention_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    apply_ring_args(args)
    set_timing(args.timing)
    return args


def card(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def time_ms(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in milliseconds; CUDA work is timed with events."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        if _timing == "steady":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
            marks[0].record()
            for mark in marks[1:]:
                fn()
                mark.record()
            marks[-1].synchronize()
            return statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def whole_sequence_sdpa_ms(heads: int, seq_len: int, dim: int, causal: bool, dtype: torch.dtype, device: str,
                           reps: int) -> tuple[float, float]:
    """Forward, and forward+backward, milliseconds of one fused SDPA call (torch's choice of
    backend) on the whole sequence: the baseline of every ring efficiency."""
    whole = [torch.randn(1, heads, seq_len, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    grad = torch.randn_like(whole[0])
    forward = time_ms(lambda: F.scaled_dot_product_attention(*whole, is_causal=causal), device, reps)
    both = time_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(*whole, is_causal=causal), whole, grad),
                   device, reps)
    return forward, both


def time_block_calls(kernel, calls: list, scale: float, device: str, reps: int,
                     backward_calls: list | None = None) -> tuple[float, float]:
    """Forward, and forward+backward, milliseconds of `calls` (q, k, v, causal) of a block
    kernel by themselves: no merge, transfer or accumulation. The backward runs on
    `backward_calls` where given (a backward that groups its calls otherwise), else on `calls`."""
    backward_calls = calls if backward_calls is None else backward_calls
    outs = [kernel.forward(q, k, v, scale=scale, causal=c, bias=None) for q, k, v, c in backward_calls]
    douts = [torch.randn_like(o) for o, _ in outs]

    def forward():
        for q, k, v, c in calls:
            kernel.forward(q, k, v, scale=scale, causal=c, bias=None)

    def backward():
        for (q, k, v, c), (o, lse), do in zip(backward_calls, outs, douts):
            kernel.backward(do, q, k, v, o, lse, scale=scale, causal=c, bias=None)

    fwd = time_ms(forward, device, reps)
    return fwd, fwd + time_ms(backward, device, reps)


def write_result(name: str, device: str, config: dict, rows: list, out: Path | None = None, **extra) -> Path:
    """JSON with the card, torch version, date and the command that produced it."""
    result = {
        "benchmark": name,
        "date": datetime.date.today().isoformat(),
        "card": card(device),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "config": config,
        **extra,
        "rows": rows,
    }
    out = out or RESULTS / f"{name}_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"# wrote {out}")
    return out

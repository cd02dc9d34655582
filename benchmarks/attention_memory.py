"""Peak memory and time of one rank's attention work (forward + backward) at growing sequence
length: the paper's RSA (quadratic in L) against the ring (linear in L), with single-device SDPA
on the whole sequence as the baseline run in the same process.

One rank of an N-rank ring is simulated on one device (benchmarks/simulated_ring.py), and a
correctness check of that rank's result on the same shapes runs before the timings.

    python benchmarks/attention_memory.py --device cpu
    python benchmarks/attention_memory.py --device cuda

Prints a table and writes benchmarks/results/attention_memory_<device>.json. Peak memory is
torch.cuda.max_memory_allocated on CUDA; on CPU, which has no allocator statistics, the peak
of live tensor storage seen by a dispatch mode (every tensor an op returns, until it is freed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_ring_arguments, apply_ring_args  # noqa: E402
from benchmarks.simulated_ring import check_rank, every_rank_holds_mine, fake_group  # noqa: E402
from lightning_seqpar.ops import ATTENTION_OPS  # noqa: E402

DEFAULTS = {
    "cpu": dict(world_size=4, seq_lens=[1024, 2048, 4096, 8192], heads=4, head_dim=64, dtype="float32", reps=2),
    "cuda": dict(world_size=8, seq_lens=[8192, 16384, 32768, 65536, 131072], heads=16, head_dim=128, dtype="bfloat16", reps=5),
}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the tensors that ops return."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._tracked:
                    self._tracked.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, nbytes)
        return result


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(method: str, seq_len: int, a) -> dict:
    """Time (median, ms) and peak memory (bytes above the inputs) of forward + backward."""
    device, dtype = a.device, getattr(torch, a.dtype)
    length = seq_len if method == "sdpa_full" else seq_len // a.world_size
    q, k, v = (torch.randn(1, a.heads, length, a.head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        if method == "sdpa_full":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
        else:
            out = ATTENTION_OPS[method](q, k, v, causal=a.causal, layout="zigzag")
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    def run():
        step()  # warm-up
        _sync(device)
        times = []
        for _ in range(a.reps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        # Memory in a separate, untimed step: the CPU tracker slows every op down.
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with LiveTensorBytes() as tracker:
                step()
            peak = tracker.peak
        return {"ms": 1e3 * sorted(times)[len(times) // 2], "peak_bytes": peak}

    try:
        if method == "sdpa_full":
            return run()
        with fake_group(a.rank, a.world_size), every_rank_holds_mine():
            return run()
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_bytes": None, "oom": True}
    finally:
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()


def correctness(a) -> dict:
    """Max relative error of one simulated rank (the middle one) on the smallest shape."""
    dtype = getattr(torch, a.dtype)
    local_len = a.seq_lens[0] // a.world_size
    # A float64 reference runs SDPA's math kernel, whose L x L scores ran out of an H100's
    # memory at L = 16K (16 heads); float32 reaches long sequences through the O(L) kernels.
    reference = torch.float32 if a.device == "cuda" else torch.float64
    errors = {}
    for algo in ("ring", "rsa"):
        e = check_rank(algo, a.world_size // 2, a.world_size, batch=1, hq=a.heads, hkv=a.heads // 2, local_len=local_len,
                       dim=a.head_dim, causal=a.causal, layout="zigzag", dtype=dtype, device=a.device, masked=False,
                       reference_dtype=reference)
        errors[algo] = max(e.values())
        e = check_rank(algo, a.world_size // 2, a.world_size, batch=2, hq=a.heads, hkv=a.heads // 2, local_len=min(local_len, 512),
                       dim=a.head_dim, causal=a.causal, layout="zigzag", dtype=dtype, device=a.device, masked=True)
        errors[algo + "_masked"] = max(e.values())
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--seq-lens", type=int, nargs="+")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--non-causal", dest="causal", action="store_false")
    parser.add_argument("--out", type=Path)
    add_ring_arguments(parser)
    a = parser.parse_args()
    apply_ring_args(a)
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.rank = a.world_size // 2
    torch.manual_seed(0)
    card = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {card} | torch {torch.__version__} | {a.dtype} | heads {a.heads} x {a.head_dim} | N = {a.world_size} | "
          f"{'causal zigzag' if a.causal else 'non-causal'} | forward + backward of one rank")
    errors = correctness(a)
    print("# correctness (max relative error vs SDPA on the global sequence): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    rows = []
    header = f"{'L':>8} {'L/N':>7} | {'SDPA full L':>20} | {'RSA (one rank)':>28} | {'ring (one rank)':>28}"
    print(header)
    print("-" * len(header))
    for seq_len in a.seq_lens:
        row = {"seq_len": seq_len, "local_len": seq_len // a.world_size}
        for method in ("sdpa_full", "rsa", "ring"):
            row[method] = measure(method, seq_len, a)
        rows.append(row)

        def cell(method, with_ratio):
            r = row[method]
            if r.get("oom"):
                return "OOM".rjust(28 if with_ratio else 20)
            text = f"{r['ms']:8.1f} ms {r['peak_bytes'] / 2**20:8.0f} MiB"
            if with_ratio:
                text += f" x{r['ms'] / row['sdpa_full']['ms']:.3f}" if row["sdpa_full"].get("ms") else "      "
            return text

        print(f"{seq_len:>8} {seq_len // a.world_size:>7} | {cell('sdpa_full', False)} | {cell('rsa', True)} | {cell('ring', True)}")
    print("# xR = time of one rank / time of SDPA on the whole sequence on one device (ideal 1/N = "
          f"{1 / a.world_size:.3f}); memory is the peak above the inputs"
          + (" (live tensor storage)" if a.device == "cpu" else " (torch.cuda.max_memory_allocated)"))
    result = {
        "benchmark": "attention_memory", "date": datetime.date.today().isoformat(), "card": card,
        "torch": torch.__version__, "command": " ".join([Path(sys.executable).name] + sys.argv),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "correctness_max_rel_error": errors, "rows": rows,
    }
    out = a.out or Path(__file__).parent / "results" / f"attention_memory_{a.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()

"""Peak GPU memory of one training step (forward, backward, AdamW) of a ~1B-parameter
Llama-style model under sequence parallelism, one rank of an N-rank group simulated on one GPU.

1. Ratio: one rank at sequence length L = N x T with sp_size N against the same model at T
   tokens on one GPU without sequence parallelism (target <= 1.15).
2. Longest sequence that trains at N = 1 (no SP, fused SDPA), 2, 4, 8 (ring), and the paper's
   RSA at the same N: the ring should grow ~N x, RSA hits its quadratic wall.

    python benchmarks/memory.py
    python benchmarks/memory.py --device cpu --model tiny --tokens 256 --world-sizes 1 2   # smoke run
    python benchmarks/memory.py --tokens 4096 8192 --world-sizes --cuda-graphs   # the ratio, graphed ring

With `--cuda-graphs` each SP step is two steps in one group, the first capturing the ring's
graphs and the second replaying them; the peak is the larger of the two, and the graphs are
dropped after.

Prints tables and writes benchmarks/results/memory_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_ring_arguments, apply_ring_args, card, write_result  # noqa: E402
from benchmarks.simulated_ring import every_rank_holds_mine, fake_group  # noqa: E402
from lightning_seqpar.ops import clear_cuda_graphs, set_cuda_graphs  # noqa: E402
from lightning_seqpar.ops._graphs import cuda_graphs_enabled  # noqa: E402
from lightning_seqpar.layout import sequence_positions  # noqa: E402
from lightning_seqpar.models.gpt import GPT, GPTConfig  # noqa: E402
from lightning_seqpar.swap import RingContext, restore_attention, swap_attention  # noqa: E402
from lightning_seqpar.swap.context import ring_context  # noqa: E402

MODELS = {
    # The shapes of configs/model/llama_1b.yaml: Llama 3.2 1B with a byte vocabulary.
    "llama_1b": GPTConfig(vocab_size=256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, mlp_hidden=8192, rope_theta=500000.0),
    "tiny": GPTConfig(),
}


class Trainee:
    """The model and its optimizer, built once; `step(tokens, world_size, algo)` runs one
    training step of one rank and returns its peak memory (bytes) or None when it runs out."""

    def __init__(self, cfg: GPTConfig, device: str):
        self.device = device
        self.model = GPT(cfg).to(device)
        self.vocab = cfg.vocab_size
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=device == "cuda")
        self.swap = None

    def _one_step(self, tokens, world_size):
        rank = world_size // 2
        ids = torch.randint(0, self.vocab, (1, tokens), device=self.device)
        labels = torch.randint(0, self.vocab, (1, tokens), device=self.device)
        positions = sequence_positions(tokens * world_size, rank, world_size, "zigzag", self.device)[None]
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            logits = self.model(ids, position_ids=positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, tokens: int, world_size: int, algo: str = "ring") -> int | None:
        if world_size > 1 and self.swap is None:
            self.swap = swap_attention(self.model)
        if world_size == 1 and self.swap is not None:
            restore_attention(self.swap)
            self.swap = None
        context = contextlib.ExitStack()
        if world_size > 1:
            context.enter_context(fake_group(world_size // 2, world_size))
            context.enter_context(every_rank_holds_mine())
            context.enter_context(ring_context(RingContext(group=None, algorithm=algo, layout="zigzag")))
        try:
            with context:
                if self.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(2 if world_size > 1 and cuda_graphs_enabled() else 1):
                    self._one_step(tokens, world_size)
                return torch.cuda.max_memory_allocated() if self.device == "cuda" else 0
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        finally:
            clear_cuda_graphs()
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()


def longest(trainee: Trainee, world_size: int, algo: str, start: int, granularity: int) -> int:
    """Largest tokens-per-rank (multiple of `granularity`) whose step fits: double, then bisect."""
    fits, fails = 0, None
    tokens = start
    while fails is None:
        if trainee.step(tokens, world_size, algo) is None:
            fails = tokens
        else:
            fits, tokens = tokens, tokens * 2
    while fails - fits > granularity:
        mid = (fits + fails) // 2 // granularity * granularity
        if trainee.step(mid, world_size, algo) is None:
            fails = mid
        else:
            fits = mid
    return fits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama_1b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384], help="tokens per rank for the ratio")
    parser.add_argument("--ratio-world-size", type=int, default=8)
    parser.add_argument("--world-sizes", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="group sizes of the longest-sequence search (none: skip it)")
    parser.add_argument("--cuda-graphs", action="store_true", help="the ring replayed from CUDA graphs (set_cuda_graphs)")
    parser.add_argument("--granularity", type=int, default=1024)
    parser.add_argument("--out", type=Path)
    add_ring_arguments(parser)
    a = parser.parse_args()
    apply_ring_args(a)
    set_cuda_graphs(a.cuda_graphs)
    cfg = MODELS[a.model]
    trainee = Trainee(cfg, a.device)
    params = sum(p.numel() for p in trainee.model.parameters())
    print(f"# {card(a.device)} | torch {torch.__version__} | {a.model}: {params / 1e9:.2f}B parameters, fp32 weights, "
          f"bf16 autocast, AdamW | one rank of an N-rank group simulated")
    trainee.step(a.tokens[0], 1)  # creates the optimizer state, part of every later peak
    rows = []
    n = a.ratio_world_size
    print(f"{'T':>7} {'L = N*T':>9} | {'no SP at T':>12} | {'SP N=' + str(n) + ' at L':>14} | ratio")
    for tokens in a.tokens:
        alone, sp = trainee.step(tokens, 1), trainee.step(tokens, n)
        ratio = sp / alone if alone and sp else None
        rows.append({"kind": "ratio", "tokens_per_rank": tokens, "seq_len": n * tokens, "world_size": n,
                     "no_sp_bytes": alone, "sp_bytes": sp, "ratio": ratio})
        fmt = lambda b: "OOM" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
        print(f"{tokens:>7} {n * tokens:>9} | {fmt(alone):>12} | {fmt(sp):>14} | {ratio:.3f}" if ratio else
              f"{tokens:>7} {n * tokens:>9} | {fmt(alone):>12} | {fmt(sp):>14} | -", flush=True)
    if a.device == "cuda" and a.world_sizes:
        print(f"{'N':>3} | {'ring: longest L':>16} | {'RSA: longest L':>15}")
        for world_size in a.world_sizes:
            step = a.granularity
            ring = longest(trainee, world_size, "ring", a.tokens[0], step) * world_size
            rsa = longest(trainee, world_size, "rsa", a.tokens[0] // 4, step // 4) * world_size if world_size > 1 else None
            rows.append({"kind": "longest", "world_size": world_size, "ring_seq_len": ring, "rsa_seq_len": rsa})
            print(f"{world_size:>3} | {ring:>16} | {rsa if rsa is not None else '(no SP)':>15}", flush=True)
        print("# N = 1 is the model without sequence parallelism (fused SDPA on the whole sequence)")
    write_result("memory", a.device, {k: v for k, v in vars(a).items() if k != "out"}, rows, a.out, parameters=params)


if __name__ == "__main__":
    main()

"""Ring efficiency on one device: how close one rank's share of an N-rank ring comes to one
fused SDPA call on the whole sequence.

    efficiency = time(fused SDPA, whole sequence) / (N x time(one rank's ring work))

One rank of the ring is simulated (benchmarks/simulated_ring.py: fake process group, each
transfer a copy on a side stream). Before the timings of each shape, that rank's output and
gradients are checked against SDPA on the global sequence (2 heads, same length and head dim),
for each op timed: the ring, the all-gather op (AG; its all-gather and reduce-scatter are local
copies here, so their link time is not counted) and the paper's RSA.

    python benchmarks/attention.py                 # CUDA: N = 8, 1K-16K tokens per rank
    python benchmarks/attention.py --device cpu --tokens 256 512 --heads 4 --world-size 4
    python benchmarks/attention.py --cuda-graphs   # the ring replayed from CUDA graphs

With `--cuda-graphs` the ring's check makes three calls in one group (eager, captured, replayed),
each checked, and its timed reps are replays (the warm-up calls capture).

Prints a table and writes benchmarks/results/attention_<device>.json.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import attention_parser, card, parse_attention_args, time_block_calls, time_ms, write_result  # noqa: E402
from benchmarks.simulated_ring import check_rank, every_rank_holds_mine, fake_group, simulated_rank  # noqa: E402
from lightning_seqpar.ops import ATTENTION_OPS, backward_blocks_per_call, clear_cuda_graphs, set_cuda_graphs  # noqa: E402
from lightning_seqpar.ops._blocks import row_view  # noqa: E402
from lightning_seqpar.ops._comm import step_groups  # noqa: E402
from lightning_seqpar.ops._kernels import select_block_kernel  # noqa: E402
from lightning_seqpar.ops._pieces import buffer_rows, causal_step_tasks, visit_plan  # noqa: E402
from lightning_seqpar.ops.ring_attention import from_sequence_major  # noqa: E402

ALGORITHMS = ("ring", "allgather", "rsa")
# bf16 keeps 8 mantissa bits: one rounding of the output alone is ~4e-3 relative.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def run_shape(a, dim, causal, tokens):
    device, dtype, n = a.device, getattr(torch, a.dtype), a.world_size
    heads = a.heads
    seq_len = n * tokens
    # Correctness first, on the same sequence length and head dim (2 heads keep it cheap); an
    # op whose check doesn't fit in memory isn't timed either.
    checked = {}
    for algo in a.algorithms:
        try:
            with simulated_rank(a.rank, n):
                errors = {}
                for seed in range(3 if a.cuda_graphs and algo == "ring" else 1):
                    seen = check_rank(algo, a.rank, n, batch=1, hq=2, hkv=2, local_len=tokens, dim=dim, causal=causal,
                                      layout="zigzag", dtype=dtype, device=device, reference_dtype=torch.float32,
                                      seed=seed, simulated=False)
                    errors = {name: max(err, errors.get(name, 0.0)) for name, err in seen.items()}
            clear_cuda_graphs()
        except torch.OutOfMemoryError:
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        checked[algo] = max(errors.values())
        if checked[algo] > TOLERANCE[dtype]:
            raise AssertionError(f"{algo} is wrong at D={dim} causal={causal} tokens={tokens}: {errors}")
    row = {"head_dim": dim, "causal": causal, "tokens_per_rank": tokens, "seq_len": seq_len,
           "max_rel_error": max(checked.values()), "rel_error_by_algorithm": checked}

    def inputs(length):
        return [torch.randn(1, heads, length, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    def timings(fn, qkv):
        forward = time_ms(lambda: fn(*qkv), device, a.reps)
        grad = torch.randn_like(qkv[0])

        def step():
            torch.autograd.grad(fn(*qkv), qkv, grad)

        return forward, time_ms(step, device, a.reps)

    def calls_alone(qkv):
        """One rank's block-kernel calls by themselves (the ring's calls on the same shapes;
        no merge, transfer, accumulation or row copy): what the block kernel alone allows. The
        backward's calls are those of its visits (`_pieces.visit_plan` at the backward's blocks
        per call), over keys laid out sequence-major as the ring's backward reads them."""
        kernel = select_block_kernel(qkv[0], has_bias=False)
        q, k, v = (t.detach() for t in qkv)
        tasks = [task for step in range(n)
                 for task in causal_step_tasks(a.rank, (a.rank - step) % n, n, tokens, "zigzag", causal)]
        calls = [(q[:, :, t.q].contiguous(), k[:, :, t.k].contiguous(), v[:, :, t.k].contiguous(), t.causal) for t in tasks]
        backward = []
        for steps in step_groups(n, backward_blocks_per_call()):
            plan = visit_plan(a.rank, steps, n, tokens, "zigzag", causal)[1]
            if steps == (0,):
                keys, values = k, v  # the own block, as the caller gave it
            else:
                buffer = torch.randn(2, buffer_rows(plan), 1, heads, dim, device=device, dtype=dtype)
                keys, values = (from_sequence_major(buffer[i]) for i in range(2))
            backward += [(q[:, :, c.q].contiguous(), row_view(keys, c.k), row_view(values, c.k), c.causal) for c in plan]
        return time_block_calls(kernel, calls, dim ** -0.5, device, a.reps, backward_calls=backward)

    whole = inputs(seq_len)
    row["sdpa_fwd_ms"], row["sdpa_fwdbwd_ms"] = timings(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), whole)
    del whole
    local = inputs(tokens)
    row["block_kernel"] = select_block_kernel(local[0], has_bias=False).name
    calls_fwd, calls_fwdbwd = calls_alone(local)
    row["calls_fwd_eff"] = row["sdpa_fwd_ms"] / (n * calls_fwd)
    row["calls_fwdbwd_eff"] = row["sdpa_fwdbwd_ms"] / (n * calls_fwdbwd)
    with fake_group(a.rank, n), every_rank_holds_mine():
        for algo in a.algorithms:
            if algo not in checked:
                row[f"{algo}_oom"] = True
                continue
            try:
                fwd, fwdbwd = timings(lambda q, k, v: ATTENTION_OPS[algo](q, k, v, causal=causal, layout="zigzag"), local)
                row[f"{algo}_fwd_ms"], row[f"{algo}_fwdbwd_ms"] = fwd, fwdbwd
                row[f"{algo}_fwd_eff"] = row["sdpa_fwd_ms"] / (n * fwd)
                row[f"{algo}_fwdbwd_eff"] = row["sdpa_fwdbwd_ms"] / (n * fwdbwd)
            except torch.OutOfMemoryError:
                row[f"{algo}_oom"] = True
                if device == "cuda":
                    torch.cuda.empty_cache()
            finally:
                clear_cuda_graphs()
    return row


def main():
    parser = attention_parser(__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS), help="the ops to check and time")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the ring from CUDA graphs (set_cuda_graphs)")
    a = parse_attention_args(parser)
    set_cuda_graphs(a.cuda_graphs)
    a.rank = 0  # zigzag gives every rank the same work; the balance benchmark checks that
    print(f"# {card(a.device)} | torch {torch.__version__} | {a.dtype} | {a.heads} heads | N = {a.world_size} (one rank simulated)")
    print(f"{'D':>4} {'mask':>7} {'tok/rank':>8} {'kernel':>9} | {'SDPA fwd':>9} {'fwd+bwd':>9} | "
          f"{'calls':>5} {'':>5} | {'ring fwd':>8} {'eff':>5} {'fwd+bwd':>8} {'eff':>5} | {'AG fwd':>8} {'eff':>5} {'fwd+bwd':>8} {'eff':>5} | "
          f"{'RSA fwd':>8} {'eff':>5} {'fwd+bwd':>8} {'eff':>5} | err")
    rows = []
    for dim, causal, tokens in itertools.product(a.head_dims, [False, True], a.tokens):
        row = run_shape(a, dim, causal, tokens)
        rows.append(row)

        def cells(algo):
            if algo not in a.algorithms:
                return f"{'-':>8} {'':>5} {'':>8} {'':>5}"
            if row.get(f"{algo}_oom"):
                return f"{'OOM':>8} {'':>5} {'':>8} {'':>5}"
            return (f"{row[f'{algo}_fwd_ms']:8.2f} {row[f'{algo}_fwd_eff']:5.2f} "
                    f"{row[f'{algo}_fwdbwd_ms']:8.2f} {row[f'{algo}_fwdbwd_eff']:5.2f}")

        print(f"{dim:>4} {'causal' if causal else 'full':>7} {tokens:>8} {row['block_kernel']:>9} | "
              f"{row['sdpa_fwd_ms']:9.2f} {row['sdpa_fwdbwd_ms']:9.2f} | {row['calls_fwd_eff']:5.2f} {row['calls_fwdbwd_eff']:5.2f} | "
              f"{cells('ring')} | {cells('allgather')} | {cells('rsa')} | {row['max_rel_error']:.1e}",
              flush=True)
    print("# times in ms; eff = SDPA on the whole sequence / (N x one rank's time); calls = the same efficiency of the "
          "rank's block-kernel calls alone (fwd, fwd+bwd); err = max relative error of the checked rank")
    write_result("attention", a.device, {k: v for k, v in vars(a).items() if k != "out"}, rows, a.out)


if __name__ == "__main__":
    main()

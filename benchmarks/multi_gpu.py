"""Sequence parallelism on several GPUs over NCCL, one process per GPU: correctness, weak
scaling, the longest sequence, torch's `context_parallel` and tensor parallelism side by side,
and a profiler trace of the ring.

    torchrun --nproc-per-node=2 benchmarks/multi_gpu.py --out-dir benchmarks/results
    torchrun --nproc-per-node=2 benchmarks/multi_gpu.py --parts correctness strategy
    torchrun --nproc-per-node=2 benchmarks/multi_gpu.py --device cpu --smoke   # the plumbing, on gloo

Parts, in this order (cheap and safe first):
- correctness: the attention algorithms (ring, allgather, rsa) on NCCL against SDPA on the whole
  sequence in float64,
  for every group size 2, 4, 8 that fits; fp32 and bf16; out, dq, dk, dv.
- strategy: `Trainer(strategy=SeqParStrategy(...))` on the GPUs against one GPU holding the
  whole sequence (a separate process), 5 AdamW steps, fp32 and bf16-mixed.
- scaling: weak scaling at fixed tokens per GPU: the ~1B Llama-style model's training step and
  the attention alone (ring and all-gather ops), N = 1 and every group size.
- checks: the training step with the per-call input check off, through the attention's NCCL
  group, and through a gloo twin of it (what the strategy registers).
- context_parallel: our ring against torch's `context_parallel` on the same shapes and GPUs.
- trace: a torch.profiler trace of one ring forward + backward on NCCL; how much of the NCCL
  kernels' time ran beside compute.
- capacity: the longest sequence that trains at N = 1 and every group size, and the paper's
  comparison with tensor parallelism on all GPUs (longest sequence, largest batch). Last,
  because a rank that runs out of memory alone leaves its peers in the ring until the
  collective timeout (`--timeout`), which ends the job.

Every part prints a table on rank 0 and writes `multi_gpu_<part>.json` to `--out-dir`.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 is forced here as well): a program using it can
put a shared host's GPUs out of service.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, time_ms, write_result  # noqa: E402
from benchmarks.memory import MODELS  # noqa: E402
from benchmarks.simulated_ring import dense_attention_mask, relative_error  # noqa: E402
from lightning_seqpar.layout import sequence_positions, shard_sequence, unshard_sequence  # noqa: E402
from lightning_seqpar.models.gpt import GPT  # noqa: E402
from lightning_seqpar.ops import ATTENTION_OPS, captured_signatures, clear_cuda_graphs, set_cuda_graphs, set_input_checks  # noqa: E402
from lightning_seqpar.ops._checks import register_check_group  # noqa: E402
from lightning_seqpar.swap import RingContext, swap_attention  # noqa: E402
from lightning_seqpar.swap.context import ring_context  # noqa: E402

PARTS = ["correctness", "strategy", "scaling", "checks", "context_parallel", "trace", "capacity"]
# fp32 comparisons must not be blurred by TF32 matmuls.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


class Run:
    """This process's place in the job and the groups every part uses."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
        self.sizes = [n for n in (2, 4, 8) if n <= self.world]
        # new_group is collective: every rank creates every group, members or not.
        self.groups = {n: dist.new_group(list(range(n))) for n in self.sizes}
        self.groups[self.world] = dist.group.WORLD
        self.groups[1] = dist.new_group([0])  # N = 1 runs on rank 0 alone

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, *text):
        if self.rank == 0:
            print(*text, flush=True)

    def write(self, part: str, config: dict, rows: list, **extra):
        if self.rank == 0:
            out = Path(self.args.out_dir) / f"multi_gpu_{part}.json"
            launcher = f"torchrun --nproc-per-node={self.world}"
            write_result(f"multi_gpu_{part}", self.device.type, config, rows, out, gpus=self.world, launcher=launcher, **extra)

    def max_over(self, value: float, group=None) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
        return t.item()

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def relative_errors(pairs, group) -> list[float]:
    """||x - ref|| / ||ref|| of tensors sharded over `group`: squared sums reduced over it."""
    sums = torch.stack([torch.stack([(x.double() - ref).square().sum(), ref.square().sum()]) for x, ref in pairs])
    dist.all_reduce(sums, group=group)
    return (sums[:, 0].sqrt() / sums[:, 1].sqrt().clamp_min(1e-300)).tolist()


# ----- correctness ------------------------------------------------------------------------------

def _attention_case(n, hkv, masked, device, *, batch=2, hq=8, dim=64, local_len=256, seed=0):
    seq_len = n * local_len
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, h, seq_len, dim, generator=gen, dtype=torch.float64).to(device) for h in (hq, hkv, hkv, hq))
    mask = None
    if masked:
        mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        mask[0, seq_len // 3:] = False  # later ranks of a contiguous cut hold no real key
        mask[1, :5] = False  # first causal queries see no real key
    return q, k, v, dout, mask


def _sdpa(q, k, v, dout, mask, causal):
    """Whole-sequence SDPA: output and gradients (fully masked rows give zeros, like the ops)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attn_mask = dense_attention_mask(mask, q.size(2), causal, q.device) if mask is not None or causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    out.backward(dout.to(out.dtype))
    return [torch.nan_to_num(t.detach()) for t in (out, q.grad, k.grad, v.grad)]


@contextlib.contextmanager
def _cuda_graphs(enabled: bool):
    """The ring replayed from CUDA graphs inside, if `enabled`; eager again after, with the
    graphs (and their memory) dropped."""
    set_cuda_graphs(enabled)
    try:
        yield
    finally:
        set_cuda_graphs(False)
        clear_cuda_graphs()


def correctness(run: Run):
    """Tolerance, per tensor (relative Frobenius error against float64 SDPA on the whole
    sequence): fp32 <= 1e-5 (TF32 off); bf16 <= 2 x the error of one-GPU bf16 SDPA on the same
    inputs + 1e-3 — sequence parallelism may not be less exact than the single-GPU kernel."""
    rows, failures = [], 0
    dtypes = [torch.float32, torch.bfloat16] if run.cuda else [torch.float32]
    local_len = 64 if run.args.smoke else 256
    run.log(f"{'N':>2} {'dtype':>8} {'algo':>9} {'mask':>6} {'layout':>10} {'Hkv':>3} {'pad':>3} | "
            f"{'worst err':>9} {'SDPA err':>9} {'tol':>8} | ok")
    for n in run.sizes:
        group = run.groups[n]
        member = run.rank < n
        for dtype in dtypes:
            for algo, causal, layout, hkv, masked in [(a, c, lay, h, m) for a in ("ring", "allgather", "rsa") for c in (False, True)
                                                      for lay in ("contiguous", "zigzag") for h in (8, 2) for m in (False, True)]:
                if not member:
                    continue
                q, k, v, dout, mask = _attention_case(n, hkv, masked, run.device, local_len=local_len)
                reference = _sdpa(q, k, v, dout, mask, causal)
                single = _sdpa(*(t.to(dtype) for t in (q, k, v, dout)), mask, causal)
                single_err = [relative_error(s, r) for s, r in zip(single, reference)]
                rank = run.rank

                def mine(x, dim=2):
                    return shard_sequence(x, dim, rank, n, layout)

                errors = [0.0] * 4
                # With --cuda-graphs the ring's first call runs eagerly, the second captures
                # and replays, the third replays: each is checked.
                graphed = run.args.cuda_graphs and algo == "ring"
                with _cuda_graphs(graphed):
                    for _ in range(3 if graphed else 1):
                        local = [mine(t).to(dtype).requires_grad_() for t in (q, k, v)]
                        out = ATTENTION_OPS[algo](*local, group=group, causal=causal, layout=layout,
                                                  key_padding_mask=None if mask is None else mine(mask, 1))
                        out.backward(mine(dout).to(dtype))
                        errors = [max(e, f) for e, f in zip(errors, relative_errors(
                            zip([out.detach()] + [t.grad for t in local], [mine(r) for r in reference]), group))]
                    captured = captured_signatures()
                tol = [1e-5] * 4 if dtype == torch.float32 else [2 * e + 1e-3 for e in single_err]
                # Where the graphs apply (CUDA; padded or not) the case must have replayed: a
                # forward and a backward graph. Elsewhere the three calls stay eager.
                ok = all(e <= t for e, t in zip(errors, tol)) and (not (graphed and run.cuda) or captured >= 2)
                failures += not ok
                worst = max(range(4), key=lambda i: errors[i] / tol[i])
                row = dict(world_size=n, dtype=str(dtype).removeprefix("torch."), algorithm=algo, causal=causal, layout=layout,
                           kv_heads=hkv, padded=masked, graphs_captured=captured, errors=dict(zip(("out", "dq", "dk", "dv"), errors)),
                           single_gpu_errors=dict(zip(("out", "dq", "dk", "dv"), single_err)), tolerance=tol, ok=ok)
                rows.append(row)
                run.log(f"{n:>2} {row['dtype']:>8} {algo:>9} {'causal' if causal else 'full':>6} {layout:>10} {hkv:>3} "
                        f"{'yes' if masked else 'no':>3} | {errors[worst]:9.2e} {single_err[worst]:9.2e} {tol[worst]:8.1e} | "
                        f"{'ok' if ok else 'FAIL'}")
        dist.barrier()
    run.log(f"# {len(rows) - failures}/{len(rows)} cases within tolerance (B=2, 8 query heads, D=64, {local_len} tokens per rank)")
    run.write("correctness", {"local_len": local_len}, rows, failures=failures)
    run.free()
    return failures


# ----- strategy ---------------------------------------------------------------------------------

STRATEGY_BATCH, STRATEGY_TRAIN, STRATEGY_VAL = 4, 20, 8  # 5 optimizer steps


# Lightning's sanity check (validation steps before training) in the graphed runs and their
# baselines: it runs under inference mode, so the forward's graph is captured there and must
# replay correctly in training.
GRAPHED_SANITY_STEPS = 2


def _fit_tiny_lm(precision: str, accelerator: str, devices: int, reference: bool, strategy=None, sp_size: int = 1,
                 sanity_steps: int = 0):
    from tests.strategy.harness import quiet_trainer, snapshot
    from tests.strategy.models import build

    import lightning as L

    class CountGraphs(L.Callback):
        """How many passes were captured by the end of the sanity check and of training, read
        before the strategy's teardown drops them."""
        captured = in_sanity_check = 0

        def on_sanity_check_end(self, trainer, pl_module):
            self.in_sanity_check = captured_signatures()

        def on_train_end(self, trainer, pl_module):
            self.captured = captured_signatures()

    dp = devices // sp_size
    model = build("lm", reference, STRATEGY_BATCH // dp, STRATEGY_TRAIN, STRATEGY_VAL)
    kwargs = dict(strategy=strategy) if strategy is not None else {}
    count = CountGraphs()
    trainer = quiet_trainer(max_epochs=1, accelerator=accelerator, devices=devices, precision=precision, callbacks=[count],
                            num_sanity_val_steps=sanity_steps, **kwargs)
    trainer.fit(model)
    return dict(state=snapshot(model), train_losses=model.train_losses, graphs_captured=count.captured,
                graphs_captured_in_sanity_check=count.in_sanity_check)


def strategy_baseline(path: str, precision: str, device: str, sanity_steps: int):
    """Entry point of the one-GPU reference process (no torchrun variables in its environment)."""
    torch.save(_fit_tiny_lm(precision, "gpu" if device == "cuda" else "cpu", 1, reference=True, sanity_steps=sanity_steps), path)


def _baseline_in_subprocess(run: Run, precision: str, sanity_steps: int, path: str):
    env = {k: v for k, v in os.environ.items() if k not in (
        "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "ROLE_NAME")}
    if run.cuda:
        env["CUDA_VISIBLE_DEVICES"] = str(run.device.index)
    subprocess.run([sys.executable, __file__, "--device", run.device.type, "--strategy-baseline", path, "--precision", precision,
                    "--sanity-steps", str(sanity_steps)], env=env, check=True, timeout=600)


def strategy(run: Run):
    """Tolerance: fp32 <= 1e-5 relative per parameter tensor (the CPU tests' bound). bf16-mixed:
    the SP run's distance from the fp32 single-GPU parameters <= 2 x the single-GPU bf16 run's
    distance from them + 1e-3, i.e. sharding the sequence costs no more than bf16 itself."""
    from lightning_seqpar import SeqParStrategy
    from tests.strategy.harness import relative_error as parameter_error  # guards all-zero tensors

    rows, failures = [], 0
    precisions = ["32-true", "bf16-mixed"] if run.cuda else ["32-true"]
    # With --cuda-graphs, runs through SeqParStrategy(cuda_graphs=True) as well: the same model
    # and padded batches (its calls carry a key padding mask, which the graphs take as an input).
    graph_modes = (False, True) if run.args.cuda_graphs and run.cuda else (False,)

    def sanity_steps(graphs: bool) -> int:
        return GRAPHED_SANITY_STEPS if graphs else 0

    with tempfile.TemporaryDirectory() as tmp:
        baselines = {}
        for graphs, precision in itertools.product(graph_modes, precisions):
            path = os.path.join(tmp, f"{precision}-{'graphs' if graphs else 'eager'}.pt")
            if run.rank == 0:
                _baseline_in_subprocess(run, precision, sanity_steps(graphs), path)
            dist.barrier()
            baselines[graphs, precision] = torch.load(path, weights_only=False) if run.rank == 0 else None
        run.log(f"{'devices':>7} {'sp':>3} {'precision':>10} | {'vs same-precision 1 GPU':>24} {'vs fp32 1 GPU':>14} "
                f"{'1-GPU bf16 vs fp32':>19} | ok")
        for sp, graphs, precision in itertools.product(run.sizes, graph_modes, precisions):
            strat = SeqParStrategy(sp_size=sp, timeout=timedelta(seconds=run.args.timeout), cuda_graphs=graphs)
            result = _fit_tiny_lm(precision, "gpu" if run.cuda else "cpu", run.world, reference=False, strategy=strat, sp_size=sp,
                                  sanity_steps=sanity_steps(graphs))
            if run.rank != 0:
                continue
            same, fp32 = baselines[graphs, precision]["state"], baselines[graphs, "32-true"]["state"]

            def worst(state, ref):
                return max(parameter_error(state[k], ref[k]) for k in ref if ref[k].is_floating_point())

            vs_same, vs_fp32 = worst(result["state"], same), worst(result["state"], fp32)
            bf16_itself = worst(same, fp32) if precision != "32-true" else 0.0
            tol = 1e-5 if precision == "32-true" else 2 * bf16_itself + 1e-3
            measured = vs_same if precision == "32-true" else vs_fp32
            # A graphed run must have replayed: a forward and a backward graph at least, the
            # forward's captured in the sanity check, under inference mode, and replayed in training.
            replayed = result["graphs_captured"] >= 2 and result["graphs_captured_in_sanity_check"] >= 1
            ok = measured <= tol and (not graphs or replayed)
            failures += not ok
            rows.append(dict(devices=run.world, sp_size=sp, precision=precision, cuda_graphs=graphs,
                             graphs_captured=result["graphs_captured"],
                             graphs_captured_in_sanity_check=result["graphs_captured_in_sanity_check"], vs_same_precision=vs_same,
                             vs_fp32=vs_fp32, single_bf16_vs_fp32=bf16_itself, tolerance=tol, ok=ok,
                             losses=result["train_losses"], baseline_losses=baselines[graphs, precision]["train_losses"]))
            run.log(f"{run.world:>7} {sp:>3} {precision:>10} | {vs_same:24.2e} {vs_fp32:14.2e} {bf16_itself:19.2e} | "
                    f"{'ok' if ok else 'FAIL'}{'  (CUDA graphs)' if graphs else ''}")
    run.log("# worst relative error over parameter tensors after 5 AdamW steps (tiny causal LM, padded batches)")
    run.write("strategy", {"global_batch": STRATEGY_BATCH, "steps": STRATEGY_TRAIN // STRATEGY_BATCH}, rows, failures=failures)
    run.free()
    return failures


# ----- weak scaling -----------------------------------------------------------------------------

class Model:
    """The benchmark model on this rank, with its attention swapped (it runs SDPA on the whole
    local sequence when no ring context is active, i.e. at N = 1)."""

    def __init__(self, run: Run, optimizer_kwargs=None):
        self.run = run
        self.cfg = MODELS["tiny" if run.args.smoke else "llama_1b"]
        torch.manual_seed(0)
        self.model = GPT(self.cfg).to(run.device)
        swap_attention(self.model)
        kwargs = optimizer_kwargs or dict(fused=run.cuda)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, **kwargs)
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, batch: int, tokens: int, n: int, rank: int, group=None, layout="zigzag"):
        device = self.run.device
        ids = torch.randint(0, self.cfg.vocab_size, (batch, tokens), device=device)
        positions = sequence_positions(tokens * n, rank, n, layout, device)[None]
        context = ring_context(RingContext(group=group, algorithm="ring", layout=layout)) if n > 1 else contextlib.nullcontext()
        with context, torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.run.cuda):
            logits = self.model(ids, position_ids=positions)
        F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self):
        del self.model, self.optimizer
        self.run.free()


def _model_flops(cfg, params_without_embedding, tokens, seq_len):
    """Training FLOPs of one rank holding `tokens` of a causal sequence of `seq_len`: 6 per
    parameter and token, plus attention (QK^T and PV, halved by the causal mask, x3 for the
    backward)."""
    attention = 3 * 2 * 2 * tokens * seq_len * cfg.n_head * cfg.head_dim * cfg.n_layer / 2
    return 6 * params_without_embedding * tokens + attention


def _attention_inputs(run, heads, kv_heads, tokens, dim, seed=1):
    gen = torch.Generator(device=run.device).manual_seed(seed + run.rank)
    dtype = torch.bfloat16 if run.cuda else torch.float32
    return [torch.randn(1, h, tokens, dim, device=run.device, dtype=dtype, generator=gen).requires_grad_() for h in (heads, kv_heads, kv_heads)]


def _time_attention(run, fn, qkv, reps):
    grad = torch.randn_like(qkv[0])

    def step():
        torch.autograd.grad(fn(*qkv), qkv, grad)

    return time_ms(step, run.device.type, reps)


def scaling(run: Run):
    """Weak scaling: tokens per GPU fixed, N grows. Model efficiency = per-GPU training FLOP/s at
    N / at N = 1; attention efficiency = per-GPU attention FLOP/s at N / at N = 1, where N = 1 is
    one fused SDPA call on the GPU's tokens (= N x t_1 / t_N, the attention work per GPU growing
    N-fold)."""
    a = run.args
    tokens_list, reps = a.tokens, a.reps
    set_input_checks(False)  # timing the ring, not the per-call shape check (tested elsewhere)
    model = Model(run)
    cfg = model.cfg
    embedding = cfg.vocab_size * cfg.d_model * 2
    rows = []
    run.log(f"{'N':>2} {'tok/GPU':>7} {'L':>7} | {'step ms':>8} {'tok/s/GPU':>10} {'TFLOP/s/GPU':>11} {'eff':>5}")
    graph_modes = (False, True) if a.cuda_graphs else (False,)
    for tokens in tokens_list:
        base = None
        for n, graphs in [(1, False)] + [(n, g) for n in run.sizes for g in graph_modes]:
            group = run.groups[n]
            with _cuda_graphs(graphs):
                if run.rank < n:
                    step_ms = time_ms(lambda: model.step(1, tokens, n, run.rank, group), run.device.type, reps)
            dist.barrier()
            step_ms = run.max_over(step_ms if run.rank < n else 0.0)
            flops = _model_flops(cfg, model.params - embedding, tokens, n * tokens)
            tflops = flops / step_ms / 1e9
            base = base or tflops
            rows.append(dict(kind="model", world_size=n, tokens_per_gpu=tokens, seq_len=n * tokens, step_ms=step_ms,
                             tokens_per_s_per_gpu=tokens / step_ms * 1e3, tflops_per_gpu=tflops, efficiency=tflops / base,
                             cuda_graphs=graphs))
            r = rows[-1]
            run.log(f"{n:>2} {tokens:>7} {n * tokens:>7} | {step_ms:8.1f} {r['tokens_per_s_per_gpu']:10.0f} {tflops:11.1f} {tflops / base:5.2f}"
                    f"{'  (CUDA graphs)' if graphs else ''}")
    model.close()
    run.log("# model step = forward + backward + AdamW of the causal LM (zigzag), bf16 autocast, batch 1")
    heads, kv_heads, dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    run.log(f"{'N':>2} {'tok/GPU':>7} {'mask':>6} {'algo':>9} | {'fwd+bwd ms':>10} {'eff':>5}   "
            f"(attention alone: {heads} q / {kv_heads} kv heads x {dim})")
    for causal in (True, False):
        for tokens in a.attention_tokens:
            qkv = _attention_inputs(run, heads, kv_heads, tokens, dim)
            expanded = [qkv[0]] + [t.detach().repeat_interleave(heads // kv_heads, 1).requires_grad_() for t in qkv[1:]]
            t1 = _time_attention(run, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), expanded, reps)
            t1 = run.max_over(t1)
            rows.append(dict(kind="attention", world_size=1, causal=causal, tokens_per_gpu=tokens, fwdbwd_ms=t1, efficiency=1.0))
            run.log(f"{1:>2} {tokens:>7} {'causal' if causal else 'full':>6} {'SDPA':>9} | {t1:10.2f} {1.0:5.2f}")
            for n in run.sizes:
                for algo, graphs in [("ring", False), ("allgather", False)] + [("ring", True)] * a.cuda_graphs:
                    with _cuda_graphs(graphs):
                        if run.rank < n:
                            tn = _time_attention(run, lambda q, k, v: ATTENTION_OPS[algo](q, k, v, group=run.groups[n], causal=causal, layout="zigzag"), qkv, reps)
                    dist.barrier()
                    tn = run.max_over(tn if run.rank < n else 0.0)
                    rows.append(dict(kind="attention", algorithm=algo, world_size=n, causal=causal, tokens_per_gpu=tokens,
                                     fwdbwd_ms=tn, efficiency=n * t1 / tn, cuda_graphs=graphs))
                    label = "ring+cg" if graphs else algo
                    run.log(f"{n:>2} {tokens:>7} {'causal' if causal else 'full':>6} {label:>9} | {tn:10.2f} {n * t1 / tn:5.2f}")
            del qkv, expanded
            run.free()
    run.log("# attention eff = N x t(fused SDPA, N=1) / t(op, N); the slowest rank's median time; "
            "ring+cg = the ring replayed from CUDA graphs")
    set_input_checks(True)
    run.write("scaling", {"tokens": tokens_list, "attention_tokens": a.attention_tokens, "reps": reps,
                          "model": "tiny" if a.smoke else "llama_1b", "cuda_graphs": a.cuda_graphs}, rows)


# ----- the per-call input check -----------------------------------------------------------------

def checks(run: Run):
    """The model's training step at the largest group size with the attention ops' input check
    off, through the attention's own group ("group": on NCCL the records are read back from the
    GPU, so the host waits for it at every attention call) and through a gloo twin of the group
    ("twin": a CPU collective, what the strategy registers). Two rounds, alternating; ratio =
    step time / step time with the check off, same round."""
    a = run.args
    n = run.sizes[-1]
    group = run.groups[n]
    twin = dist.new_group(list(range(n)), backend="gloo")  # every rank takes part in new_group
    model = Model(run)
    rows = []
    run.log(f"{'tok/GPU':>7} {'round':>5} | {'off ms':>8} {'group ms':>8} {'twin ms':>8} | {'group/off':>9} {'twin/off':>8}")
    for tokens in a.tokens:
        for round_ in (1, 2):
            times = {}
            for mode in ("off", "group", "twin"):
                set_input_checks(mode != "off")
                register_check_group(group, twin if mode == "twin" and run.rank < n else None)
                t = 0.0
                if run.rank < n:
                    t = time_ms(lambda: model.step(1, tokens, n, run.rank, group), run.device.type, a.reps)
                dist.barrier()
                times[mode] = run.max_over(t)
            register_check_group(group, None)
            set_input_checks(True)
            rows.append(dict(world_size=n, tokens_per_gpu=tokens, round=round_, **{f"{m}_ms": t for m, t in times.items()},
                             group_over_off=times["group"] / times["off"], twin_over_off=times["twin"] / times["off"]))
            r = rows[-1]
            run.log(f"{tokens:>7} {round_:>5} | {times['off']:8.1f} {times['group']:8.1f} {times['twin']:8.1f} | "
                    f"{r['group_over_off']:9.3f} {r['twin_over_off']:8.3f}")
    model.close()
    run.log(f"# N = {n}, the model's training step (batch 1, bf16 autocast), the slowest rank's median")
    run.write("checks", {"tokens": a.tokens, "reps": a.reps, "model": "tiny" if a.smoke else "llama_1b"}, rows)


# ----- torch's context_parallel -----------------------------------------------------------------

def context_parallel(run: Run):
    """Our ring against torch's `context_parallel` (its SDPA dispatch, load balancing on, both of
    its rotate methods) on the same shapes, all GPUs, forward + backward, bf16. Correctness beside
    it: each output against one fused SDPA call on the whole sequence."""
    if not run.cuda:
        run.log("# context_parallel: skipped (torch's implementation dispatches the CUDA SDPA kernels)")
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel as torch_context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel_unshard, set_rotate_method

    a = run.args
    mesh = init_device_mesh("cuda", (run.world,), mesh_dim_names=("cp",))
    n, heads, dim = run.world, a.cp_heads, a.cp_head_dim
    set_input_checks(False)
    rows = []
    run.log(f"{'mask':>6} {'tok/GPU':>7} | {'ours ms':>8} {'err':>7} | {'CP allgather':>12} {'err':>7} | {'CP alltoall':>11} {'err':>7} | ratio")
    for causal in (True, False):
        for tokens in a.tokens:
            gen = torch.Generator(device=run.device).manual_seed(7)
            q, k, v, dout = (torch.randn(1, heads, n * tokens, dim, device=run.device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
            reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def error(global_out):
                return relative_error(global_out, reference)

            layout = "zigzag" if causal else "contiguous"  # the same cut as torch's
            local = [shard_sequence(t, 2, run.rank, n, layout).requires_grad_() for t in (q, k, v)]
            local_dout = shard_sequence(dout, 2, run.rank, n, layout)

            def ours():
                return ATTENTION_OPS["ring"](*local, causal=causal, layout=layout)

            ours_ms = run.max_over(time_ms(lambda: torch.autograd.grad(ours(), local, local_dout), "cuda", a.reps))
            # Stored as the kernels return it ([B, L, H, D] strides, as SDPA's own output is);
            # all_gather wants it dense.
            out = ours().detach().contiguous()
            gathered = [torch.empty_like(out) for _ in range(n)]
            dist.all_gather(gathered, out)
            row = dict(causal=causal, tokens_per_gpu=tokens, seq_len=n * tokens, ours_ms=ours_ms,
                       ours_error=error(unshard_sequence(gathered, 2, layout)))
            # torch's load balancing (head-tail, i.e. our zigzag) is for causal masks only.
            _cp_options.enable_load_balance = causal
            for method in ("allgather", "alltoall"):
                set_rotate_method(method)
                cq, ck, cv, cd = (t.clone() for t in (q, k, v, dout))
                with torch_context_parallel(mesh, buffers=[cq, ck, cv, cd], buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers={cq, ck, cv, cd}):
                    for t in (cq, ck, cv):
                        t.requires_grad_()

                    def theirs():
                        return F.scaled_dot_product_attention(cq, ck, cv, is_causal=causal)

                    row[f"cp_{method}_ms"] = run.max_over(time_ms(lambda: torch.autograd.grad(theirs(), (cq, ck, cv), cd), "cuda", a.reps))
                    cp_out = theirs().detach()
                (whole,) = context_parallel_unshard(mesh, [cp_out], [2])
                row[f"cp_{method}_error"] = error(whole)
                del cq, ck, cv, cd, cp_out, whole
            best = min(row["cp_allgather_ms"], row["cp_alltoall_ms"])
            row["ratio_best_cp_over_ours"] = best / ours_ms
            rows.append(row)
            run.log(f"{'causal' if causal else 'full':>6} {tokens:>7} | {ours_ms:8.2f} {row['ours_error']:7.1e} | "
                    f"{row['cp_allgather_ms']:12.2f} {row['cp_allgather_error']:7.1e} | {row['cp_alltoall_ms']:11.2f} "
                    f"{row['cp_alltoall_error']:7.1e} | {best / ours_ms:5.2f}")
            del q, k, v, dout, reference, local, gathered, out
            run.free()
    run.log(f"# ms = forward + backward, slowest rank's median; ratio = best torch CP / ours (>1: ours faster); "
            f"err = relative error of the gathered output against one fused SDPA call; {heads} heads x {dim}, bf16, N = {n}")
    set_input_checks(True)
    run.write("context_parallel", {"tokens": a.tokens, "heads": heads, "head_dim": dim, "reps": a.reps}, rows)


# ----- trace ------------------------------------------------------------------------------------

def trace(run: Run):
    if not run.cuda:
        run.log("# trace: skipped (it shows CUDA streams)")
        return
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.trace import overlap_summary

    a, n = run.args, run.world
    cfg = MODELS["llama_1b"]
    set_input_checks(False)
    rows = []
    for causal in (True, False):
        qkv = _attention_inputs(run, cfg.n_head, cfg.n_kv_head, a.trace_tokens, cfg.head_dim)
        grad = torch.randn_like(qkv[0])

        def step():
            torch.autograd.grad(ATTENTION_OPS["ring"](*qkv, causal=causal, layout="zigzag"), qkv, grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        path = Path(a.out_dir) / f"multi_gpu_trace_rank{run.rank}_{'causal' if causal else 'full'}.json"
        prof.export_chrome_trace(str(path))
        summary = overlap_summary(path)
        if run.rank != 0:
            path.unlink()  # one rank's trace is enough to look at; every rank's summary is kept
        summaries = [None] * n
        dist.all_gather_object(summaries, summary)
        for rank, s in enumerate(summaries):
            rows.append(dict(rank=rank, causal=causal, tokens_per_gpu=a.trace_tokens, **s))
            run.log(f"rank {rank} {'causal' if causal else 'full':>6}: compute stream {s['compute_stream_us'] / 1e3:.2f} ms, "
                    f"NCCL {s['transfer_us'] / 1e3:.2f} ms, of which {100 * (s['overlap'] or 0):.0f}% ran beside compute")
        del qkv, grad
    set_input_checks(True)
    run.write("trace", {"tokens_per_gpu": a.trace_tokens, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head, "head_dim": cfg.head_dim}, rows)


# ----- capacity: longest sequence, and sequence vs tensor parallelism ---------------------------

def _fits(run: Run, fn, group, optimizer) -> bool:
    """Did `fn()` fit on every rank of `group`? A rank that runs out of memory stops where it is;
    with symmetric ranks (zigzag) its peers run out at the same allocation."""
    ok = True
    try:
        fn()
    except torch.OutOfMemoryError:
        ok = False
        optimizer.zero_grad(set_to_none=True)
    run.free()
    return run.max_over(0.0 if ok else 1.0, group) == 0.0


def _search(fits, start: int, granularity: int) -> int:
    """Largest multiple of `granularity` for which `fits` holds: double, then bisect."""
    good, bad, value = 0, None, start
    while bad is None:
        if fits(value):
            good, value = value, value * 2
        else:
            bad = value
    while bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _tensor_parallel(model: Model, n: int):
    """Megatron-style tensor parallelism of the same model over `n` GPUs, through the plan that
    Lightning's ModelParallelStrategy applies in `configure_model` (torch's parallelize_module):
    Q/K/V and gate/up column-wise, O and down row-wise; embeddings, norms and head replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(model.run.device.type, (n,), mesh_dim_names=("tp",))
    plan = {name: ColwiseParallel() for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate", "mlp.up")}
    plan.update({"attn.o_proj": RowwiseParallel(), "mlp.down": RowwiseParallel()})
    for block in model.model.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= n  # the projections now produce this rank's heads only
        block.attn.n_kv_head //= n


def capacity(run: Run):
    a = run.args
    rows = []
    gran = 64 if a.smoke else a.granularity
    start = 256 if a.smoke else 8192
    if not run.cuda and not a.smoke:
        run.log("# capacity: needs GPU memory to exhaust")
        return
    lean = dict(foreach=False)  # no multi-tensor temporaries in the optimizer's peak
    model = Model(run, lean)

    def sp_step(n, batch, tokens):
        return lambda: model.step(batch, tokens, n, run.rank, run.groups[n])

    # Smoke runs on CPU can't run out of memory; they check the plumbing with a fixed budget.
    limit = (lambda batch, tokens: batch * tokens <= 1024) if a.smoke else (lambda batch, tokens: True)

    def sp_fits(n, batch, tokens):
        if not limit(batch, tokens):
            return run.max_over(1.0) == 0.0
        member = run.rank < n
        ok = _fits(run, sp_step(n, batch, tokens), run.groups[n], model.optimizer) if member else True
        dist.barrier()
        return run.max_over(0.0 if ok else 1.0) == 0.0

    config = {"granularity": gran, "batch_seq_len": a.batch_seq_len // 8 if a.smoke else a.batch_seq_len,
              "model": "tiny" if a.smoke else "llama_1b"}
    run.log(f"{'N':>2} | {'longest L (ring, zigzag)':>24} {'x N=1':>6}")
    single = None
    for n in [1] + run.sizes:
        longest = _search(lambda t: sp_fits(n, 1, t), start, gran) * n
        single = single or longest
        rows.append(dict(kind="longest", parallelism="sequence" if n > 1 else "none", world_size=n, seq_len=longest,
                         vs_single=longest / single, target=0.9 * n))
        run.log(f"{n:>2} | {longest:>24} {longest / single:6.2f}")
        # Written after every search: a long search cut short by the job's time limit keeps the rest.
        run.write("capacity", config, rows)
    n = run.world
    fixed_len = config["batch_seq_len"]
    sp_batch = _search(lambda b: sp_fits(n, b, fixed_len // n), 1, 1)
    model.close()

    model = Model(run, lean)
    _tensor_parallel(model, n)
    gen_seed = 1234

    def tp_fits(batch, tokens):
        if not limit(batch, tokens // n):
            return run.max_over(1.0) == 0.0

        def step():
            torch.manual_seed(gen_seed)  # TP ranks must see the same tokens
            model.step(batch, tokens, 1, 0)

        return _fits(run, step, None, model.optimizer)

    tp_len = _search(lambda t: tp_fits(1, t), start, gran * n)
    tp_batch = _search(lambda b: tp_fits(b, fixed_len), 1, 1)
    model.close()
    sp_len = rows[-1]["seq_len"]
    rows.append(dict(kind="sp_vs_tp", world_size=n, sp_longest=sp_len, tp_longest=tp_len, fixed_seq_len=fixed_len,
                     sp_max_batch=sp_batch, tp_max_batch=tp_batch))
    run.log(f"# on {n} GPUs, batch 1: longest sequence SP {sp_len} vs TP {tp_len} ({sp_len / max(tp_len, 1):.2f}x); "
            f"largest batch at L = {fixed_len}: SP {sp_batch} vs TP {tp_batch}")
    run.write("capacity", config, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384], help="tokens per GPU")
    parser.add_argument("--attention-tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="tokens per GPU of the attention-alone rows of the scaling part")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--cp-heads", type=int, default=32)
    parser.add_argument("--cp-head-dim", type=int, default=64)
    parser.add_argument("--trace-tokens", type=int, default=8192)
    parser.add_argument("--granularity", type=int, default=1024, help="tokens per GPU, for the longest-sequence search")
    parser.add_argument("--batch-seq-len", type=int, default=8192, help="sequence length of the largest-batch search")
    parser.add_argument("--timeout", type=int, default=300, help="collective timeout, seconds")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes: checks the plumbing")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also check the ring replayed from CUDA graphs (correctness: three calls per case) and time it "
                             "(scaling: model and ring rows with graphs on beside the eager ones)")
    parser.add_argument("--strategy-baseline", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--sanity-steps", type=int, default=0, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.strategy_baseline:
        return strategy_baseline(a.strategy_baseline, a.precision, a.device, a.sanity_steps)
    if a.smoke:
        a.tokens, a.attention_tokens, a.trace_tokens, a.reps = [256, 512], [256, 512], 512, 2
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", timeout=timedelta(seconds=a.timeout))
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    run = Run(a)
    run.log(f"# {dist.get_world_size()} x {torch.cuda.get_device_name() if run.cuda else 'CPU'} | torch {torch.__version__} | "
            f"{dist.get_backend()} | NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}")
    failures = 0
    for part in PARTS:
        if part in a.parts:
            run.log(f"\n## {part}")
            failures += globals()[part](run) or 0
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        raise SystemExit(f"{failures} correctness checks failed")


if __name__ == "__main__":
    main()

"""Plots for BENCHMARKS.md from the JSON results in benchmarks/results/.

    python benchmarks/plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


# The current code's table (BENCHMARKS.md, section 1): the ring replayed and eager, the
# all-gather op and RSA from the eager run.
EFFICIENCY_FILES = {"replayed": "attention_h100_current_graphs.json", "eager": "attention_h100_current_eager.json"}


def efficiency_plot():
    runs = {name: json.loads((RESULTS / file).read_text()) for name, file in EFFICIENCY_FILES.items()}
    eager = runs["eager"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharey=True)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    series = [(dim, causal, next(colors)) for dim in sorted({r["head_dim"] for r in eager["rows"]}) for causal in (False, True)]
    for ax, phase in zip(axes, ("fwd", "fwdbwd")):
        for dim, causal, color in series:
            for name, style in (("replayed", "-"), ("eager", "--")):
                rows = [r for r in runs[name]["rows"] if r["head_dim"] == dim and r["causal"] == causal]
                ax.plot([r["tokens_per_rank"] for r in rows], [r[f"ring_{phase}_eff"] for r in rows], style, color=color,
                        marker="o" if name == "replayed" else None, lw=1.6 if name == "replayed" else 0.9,
                        label=f"ring {name}, D={dim}, {'causal zigzag' if causal else 'non-causal'}")
        for causal, style in ((False, "--"), (True, ":")):
            gathered = [r for r in eager["rows"] if r["head_dim"] == 128 and r["causal"] == causal and r.get(f"allgather_{phase}_eff")]
            ax.plot([r["tokens_per_rank"] for r in gathered], [r[f"allgather_{phase}_eff"] for r in gathered], "m" + style,
                    marker="s", label=f"all-gather op (eager), D=128, {'causal zigzag' if causal else 'non-causal'}")
        rsa = [r for r in eager["rows"] if r["head_dim"] == 128 and not r["causal"] and r.get(f"rsa_{phase}_eff")]
        ax.plot([r["tokens_per_rank"] for r in rsa], [r[f"rsa_{phase}_eff"] for r in rsa], "k--", marker="x",
                label="RSA, D=128, non-causal (out of memory from 4K)")
        # The targets: from 4K tokens per rank 0.90 forward / 0.85 forward+backward, from 8K 0.95.
        ax.hlines(0.90 if phase == "fwd" else 0.85, 4096, 8192, color="grey", lw=1.0, ls=":")
        ax.hlines(0.95, 8192, 16384, color="grey", lw=1.0, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_title(("forward" if phase == "fwd" else "forward + backward") + " (grey: the targets)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency vs one fused SDPA call / N")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"{eager['card']}, N = {eager['config']['world_size']} (one rank simulated), bf16, {eager['date']}")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(RESULTS / "attention_efficiency.png", dpi=110)


def memory_plot():
    data = json.loads((RESULTS / "attention_memory_cuda.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in (("sdpa_full", "SDPA, whole sequence, one GPU"), ("rsa", "RSA, one of 8 ranks"), ("ring", "ring, one of 8 ranks")):
        rows = [r for r in data["rows"] if not r[method].get("oom")]
        ax.plot([r["seq_len"] for r in rows], [r[method]["peak_bytes"] / 2**30 for r in rows], marker="o", label=label)
    ax.axhline(80, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("peak memory above inputs (GiB)")
    ax.set_title(f"attention fwd+bwd memory, {data['card']}, {data['date']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "attention_memory.png", dpi=110)


# The 4-GPU weak-scaling rows came from two jobs of the same code (4K and 16K; 8K): both plotted.
SCALING_FILES = ("multi_gpu_scaling_4gpu.json", "multi_gpu_scaling_4gpu_8k_round2.json")


def multi_gpu_plot():
    runs = [json.loads((RESULTS / name).read_text()) for name in SCALING_FILES]
    scaling = {**runs[0], "rows": sorted((r for run in runs for r in run["rows"]), key=lambda r: r["tokens_per_gpu"])}
    capacity = json.loads((RESULTS / "multi_gpu_capacity_4gpu.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for n in sorted({r["world_size"] for r in scaling["rows"]} - {1}):
        model = [r for r in scaling["rows"] if r["kind"] == "model" and r["world_size"] == n]
        left.plot([r["tokens_per_gpu"] for r in model], [r["efficiency"] for r in model], marker="s", label=f"1B model step, N={n}")
        for algorithm, style in (("ring", "-"), ("allgather", ":")):
            for causal in (True, False):
                rows = [r for r in scaling["rows"] if r["kind"] == "attention" and r["world_size"] == n
                        and r["causal"] == causal and r.get("algorithm", "ring") == algorithm]
                left.plot([r["tokens_per_gpu"] for r in rows], [r["efficiency"] for r in rows], style, marker="o",
                          label=f"{algorithm} attention, N={n}, {'causal zigzag' if causal else 'non-causal'}")
    left.axhline(0.90, color="grey", lw=0.8, ls=":")
    left.axhline(0.85, color="grey", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set_xlabel("tokens per GPU")
    left.set_ylabel("per-GPU throughput at N / at N = 1")
    left.set_title(f"weak scaling over NCCL: {scaling['gpus']} x {scaling['card']}, {scaling['date']}", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    longest = [r for r in capacity["rows"] if r["kind"] == "longest"]
    versus = next(r for r in capacity["rows"] if r["kind"] == "sp_vs_tp")
    labels = [f"N={r['world_size']}" + (" (no SP)" if r["world_size"] == 1 else " SP") for r in longest] + [f"N={versus['world_size']} TP"]
    values = [r["seq_len"] / 1024 for r in longest] + [versus["tp_longest"] / 1024]
    right.bar(labels, values, color=["tab:grey"] + ["tab:blue"] * (len(longest) - 1) + ["tab:orange"])
    for x, value in enumerate(values):
        right.text(x, value, f"{value:.0f}K", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("longest sequence that trains (K tokens)")
    right.set_title(f"~1B Llama-style model, AdamW, bf16 autocast, batch 1\n{capacity['gpus']} x {capacity['card']}, "
                    f"{capacity['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "multi_gpu.png", dpi=110)


if __name__ == "__main__":
    efficiency_plot()
    memory_plot()
    multi_gpu_plot()
    print(f"wrote the plots to {RESULTS}")

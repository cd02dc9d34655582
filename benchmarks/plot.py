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


def efficiency_plot():
    data = json.loads((RESULTS / "attention_cuda.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, phase in zip(axes, ("fwd", "fwdbwd")):
        for dim in sorted({r["head_dim"] for r in data["rows"]}):
            for causal in (False, True):
                rows = [r for r in data["rows"] if r["head_dim"] == dim and r["causal"] == causal]
                label = f"ring, D={dim}, {'causal zigzag' if causal else 'non-causal'}"
                ax.plot([r["tokens_per_rank"] for r in rows], [r[f"ring_{phase}_eff"] for r in rows], marker="o", label=label)
        rsa = [r for r in data["rows"] if r["head_dim"] == 128 and not r["causal"] and f"rsa_{phase}_eff" in r]
        ax.plot([r["tokens_per_rank"] for r in rsa], [r[f"rsa_{phase}_eff"] for r in rsa], "k--", marker="x", label="RSA, D=128, non-causal")
        ax.axhline(0.95 if phase == "fwd" else 0.85, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_title("forward" if phase == "fwd" else "forward + backward")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency vs one fused SDPA call / N")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{data['card']}, N = {data['config']['world_size']} (one rank simulated), bf16, {data['date']}")
    fig.tight_layout()
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


if __name__ == "__main__":
    efficiency_plot()
    memory_plot()
    print(f"wrote {RESULTS / 'attention_efficiency.png'} and {RESULTS / 'attention_memory.png'}")

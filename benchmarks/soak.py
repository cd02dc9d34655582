"""Soak test: many optimizer steps of dp 2 × sp 2 on 4 CPU processes (script launcher,
strategy "seqpar"); the loss must fall and no rank's resident memory may grow.

    python benchmarks/soak.py                      # 240 steps, GPT d_model 64, 2 layers, 128 tokens
    python benchmarks/soak.py --steps 400 --tokens 256

The task is copying: each sequence is a random half followed by the same half, so the second
half is predictable only by attending across the sequence (and so across chunks). Every rank
samples its RSS (/proc/self/status VmRSS) after each optimizer step; rank 0 prints a table
(loss, and RSS per rank at steps 1, 20, halfway from 20 to the end, and the end) and writes benchmarks/results/soak_cpu.json.
Pass: final loss < 0.5 × the loss at step 1, and per rank RSS(end) - RSS(step 20) <= --rss-slack-mib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from lightning_seqpar import SeqParStrategy, cross_entropy  # noqa: E402
from lightning_seqpar.models.gpt import GPT, GPTConfig  # noqa: E402

VOCAB = 64


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class CopyTask(Dataset):
    """Sequence i: a random half h_i then h_i again; labels shifted on the whole sequence, the
    first half ignored (it can't be predicted)."""

    def __init__(self, n: int, tokens: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        half = torch.randint(1, VOCAB, (n, tokens // 2), generator=gen)
        self.ids = torch.cat([half, half], dim=1)
        self.labels = torch.full_like(self.ids, -100)
        self.labels[:, tokens // 2 : -1] = self.ids[:, tokens // 2 + 1 :]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class SoakLM(L.LightningModule):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=args.layers, n_head=4, d_model=args.d_model))
        self.losses: list[float] = []
        self.rss: list[float] = []

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"], position_ids=batch["position_ids"])
        loss = cross_entropy(logits, batch["labels"])
        self.losses.append(loss.item())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.rss.append(rss_mib())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        data = CopyTask(self.args.steps * self.args.batch * 2, self.args.tokens)
        return DataLoader(data, batch_size=self.args.batch, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per SP group per step")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rss-slack-mib", type=float, default=8.0)
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    module = SoakLM(args)
    trainer = L.Trainer(
        accelerator="cpu", devices=4, strategy=SeqParStrategy(sp_size=2), max_steps=args.steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (module.losses, module.rss))
    if trainer.global_rank != 0:
        return
    losses = gathered[0][0]
    at = [1, 20, (20 + len(losses)) // 2, len(losses)]
    rows = []
    print(f"{'rank':>4} {'(dp,sp)':>7} | " + " | ".join(f"RSS@{s:<4} MiB" for s in at) + " | growth 20->end MiB")
    for rank, (_, rss) in enumerate(gathered):
        growth = rss[-1] - rss[19]
        rows.append({"rank": rank, "dp_rank": rank // 2, "sp_rank": rank % 2,
                     **{f"rss_mib_step_{s}": round(rss[s - 1], 1) for s in at},
                     "rss_growth_mib_20_to_end": round(growth, 1), "rss_max_mib_20_to_end": round(max(rss[19:]), 1)})
        print(f"{rank:>4} {str((rank // 2, rank % 2)):>7} | " + " | ".join(f"{rss[s - 1]:>12.1f}" for s in at)
              + f" | {growth:>+8.1f}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    loss_first, loss_last = losses[0], mean(losses[-10:])
    print(f"loss: step 1 {loss_first:.4f}, step 20 {losses[19]:.4f}, mean of last 10 steps {loss_last:.4f} "
          f"({len(losses)} optimizer steps)")
    loss_ok = loss_last < 0.5 * loss_first
    rss_ok = all(r["rss_growth_mib_20_to_end"] <= args.rss_slack_mib for r in rows)
    print(f"loss decreases: {loss_ok}; RSS growth 20->end <= {args.rss_slack_mib} MiB on every rank: {rss_ok}")
    write_result(
        "soak", "cpu", vars(args), rows, world="dp 2 × sp 2", steps=len(losses),
        loss={"step_1": loss_first, "step_20": losses[19], "last_10_mean": loss_last,
              "every_10th": losses[::10]},
        passed={"loss_decreases": loss_ok, "rss_flat": rss_ok},
    )
    if not (loss_ok and rss_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()

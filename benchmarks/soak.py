"""Soak test: many optimizer steps of dp 2 × sp 2 on 4 CPU processes (script launcher,
strategy "seqpar"); the loss must fall and no rank's memory may grow.

    python benchmarks/soak.py                      # 1000 steps, GPT d_model 64, 2 layers, 128 tokens
    python benchmarks/soak.py --steps 2000 --tokens 256

The task is copying: each sequence is a random half followed by the same half, so the second
half is predictable only by attending across the sequence (and so across chunks).

Every rank samples, after each optimizer step, its RSS (/proc/self/status VmRSS) and the bytes
in use in the C heap (glibc mallinfo2: torch's CPU tensors, gloo, and Python objects > 512 B).
RSS alone doesn't tell a leak from warm-up. Heap in use rises ~3 MiB over the first ~350 steps
and is then flat to a few KiB: gloo's collectives warm up (a loop of the ring attention's input
check, an 8-integer all-gather, alone grows the heap ~1.8 MiB over ~2000 calls, then not at all;
DDP's all-reduce ~2 MiB over ~500; the ring's send/receive not at all). And glibc keeps freed
heap memory mapped and touches more of it as the allocation pattern shifts, so RSS creeps on
for a while with nothing live behind it. Hence three measures, per rank:

- second half (from halfway between step 20 and the end, to the end): RSS growth and heap-in-use
  growth. A leak grows with the number of steps, so it shows here; warm-up doesn't. With the
  default 1000 steps the second half is 490 steps: a leak of more than 4.2 KiB/step fails the
  RSS check, one of more than 0.52 KiB/step of heap memory the heap check (the benchmark's own
  per-step samples, 24 bytes/step, are under 0.012 MiB).
- held memory from step 20 to the end: RSS right after `malloc_trim(0)` (the allocator's free
  pages given back) at step 20 and at the end; it grows only by what is live (the warm-up).
- RSS from step 20 to the end as sampled, a least-squares slope over the second half, the number
  of Python objects the garbage collector tracks (step 20, end), and RSS and heap in use every
  steps/50 steps: reported.

Rank 0 prints a table and writes benchmarks/results/soak_cpu.json. Pass: final loss < 0.5 × the
loss at step 1; per rank, second-half RSS growth <= --rss-slack-mib, second-half heap growth <=
--heap-slack-mib (where glibc gives mallinfo2), held growth 20 -> end <= --held-slack-mib.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
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


WARM_STEP = 20  # memory is compared from here to the end


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None


_LIBC = _glibc()


def heap_in_use_mib() -> float | None:
    """Bytes the C allocator has handed out and not got back (heap chunks + mmapped chunks)."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def held_rss_mib() -> float | None:
    """RSS after the allocator gives its free pages back to the system."""
    if _LIBC is None:
        return None
    _LIBC.malloc_trim(0)
    return rss_mib()


def slope_kib_per_step(values: list[float], first: int) -> float:
    """Least-squares slope of values[first - 1:] (MiB, one per step) in KiB per step."""
    ys = values[first - 1 :]
    xs = range(len(ys))
    mx, my = (len(ys) - 1) / 2, sum(ys) / len(ys)
    return 1024 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


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
        self.heap: list[float | None] = []
        self.marks: dict[str, float | int | None] = {}  # held RSS and Python objects at step 20 and the end

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"], position_ids=batch["position_ids"])
        loss = cross_entropy(logits, batch["labels"])
        self.losses.append(loss.item())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.rss.append(rss_mib())
        self.heap.append(heap_in_use_mib())
        step = len(self.rss)
        if step in (WARM_STEP, self.args.steps):
            # After this step's sample, and the object count before the trim: its list of every
            # object (~4 MiB) would otherwise stay resident and show as growth after this step.
            self.marks[f"py_objects_{step}"] = len(gc.get_objects())
            self.marks[f"held_rss_{step}"] = held_rss_mib()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        data = CopyTask(self.args.steps * self.args.batch * 2, self.args.tokens)
        return DataLoader(data, batch_size=self.args.batch, shuffle=True)


def mid_step(steps: int) -> int:
    return (WARM_STEP + steps) // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per SP group per step")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rss-slack-mib", type=float, default=2.0, help="RSS growth allowed over the second half")
    parser.add_argument("--heap-slack-mib", type=float, default=0.25, help="heap-in-use growth allowed over the second half")
    parser.add_argument("--held-slack-mib", type=float, default=8.0, help="held-RSS growth allowed from step 20 to the end")
    args = parser.parse_args()
    if args.steps < 4 * WARM_STEP:
        parser.error(f"--steps must be at least {4 * WARM_STEP}")
    start = time.perf_counter()

    L.seed_everything(0, verbose=False)
    module = SoakLM(args)
    trainer = L.Trainer(
        accelerator="cpu", devices=4, strategy=SeqParStrategy(sp_size=2), max_steps=args.steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (module.losses, module.rss, module.heap, module.marks))
    if trainer.global_rank != 0:
        return
    wall_s = time.perf_counter() - start
    losses = gathered[0][0]
    steps = len(losses)
    mid = mid_step(steps)
    at = [1, WARM_STEP, mid, steps]

    def fmt(x, spec="8.1f"):
        return f"{x:{spec}}" if x is not None else f"{'-':>{spec.split('.')[0]}}"

    rows = []
    print(f"{steps} optimizer steps; second half = steps {mid}..{steps}; MiB")
    print(f"{'rank':>4} {'(dp,sp)':>7} | " + " ".join(f"RSS@{s:<5}" for s in at)
          + " | RSS 20->end  2nd half  KiB/step | heap@20   heap@mid  heap@end 2nd half | held@20 held@end  growth")
    for rank, (_, rss, heap, marks) in enumerate(gathered):
        held_20, held_end = marks.get(f"held_rss_{WARM_STEP}"), marks.get(f"held_rss_{steps}")
        has_heap = heap[-1] is not None
        row = {
            "rank": rank, "dp_rank": rank // 2, "sp_rank": rank % 2,
            **{f"rss_mib_step_{s}": round(rss[s - 1], 2) for s in at},
            "rss_growth_mib_20_to_end": round(rss[-1] - rss[WARM_STEP - 1], 2),
            "rss_growth_mib_second_half": round(rss[-1] - rss[mid - 1], 2),
            "rss_max_minus_mid_mib_second_half": round(max(rss[mid - 1 :]) - rss[mid - 1], 2),
            "rss_slope_kib_per_step_second_half": round(slope_kib_per_step(rss, mid), 3),
            "rss_slope_kib_per_step_20_to_end": round(slope_kib_per_step(rss, WARM_STEP), 3),
            **{f"heap_in_use_mib_step_{s}": round(heap[s - 1], 2) if has_heap else None for s in at},
            "heap_growth_mib_20_to_end": round(heap[-1] - heap[WARM_STEP - 1], 3) if has_heap else None,
            "heap_growth_mib_second_half": round(heap[-1] - heap[mid - 1], 3) if has_heap else None,
            f"held_rss_mib_step_{WARM_STEP}": None if held_20 is None else round(held_20, 2),
            f"held_rss_mib_step_{steps}": None if held_end is None else round(held_end, 2),
            "held_rss_growth_mib_20_to_end": None if held_20 is None else round(held_end - held_20, 2),
            **{f"py_objects_step_{s}": marks[f"py_objects_{s}"] for s in (WARM_STEP, steps)},
            "rss_mib_every_stride": [round(x, 1) for x in rss[:: max(1, steps // 50)]],
            "heap_in_use_mib_every_stride": [round(x, 2) for x in heap[:: max(1, steps // 50)]] if has_heap else None,
        }
        rows.append(row)
        print(f"{rank:>4} {str((rank // 2, rank % 2)):>7} | " + " ".join(f"{rss[s - 1]:9.1f}" for s in at)
              + f" | {row['rss_growth_mib_20_to_end']:+11.1f} {row['rss_growth_mib_second_half']:+9.2f}"
              + f" {row['rss_slope_kib_per_step_second_half']:9.2f}"
              + f" | {fmt(heap[WARM_STEP - 1])} {fmt(heap[mid - 1], '9.1f')} {fmt(heap[-1], '9.1f')}"
              + f" {fmt(row['heap_growth_mib_second_half'], '+8.3f')}"
              + f" | {fmt(held_20)} {fmt(held_end)} {fmt(row['held_rss_growth_mib_20_to_end'], '+7.1f')}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    loss_first, loss_last = losses[0], mean(losses[-10:])
    print(f"loss: step 1 {loss_first:.4f}, step 20 {losses[19]:.4f}, mean of last 10 steps {loss_last:.4f}")
    passed = {
        "loss_decreases": loss_last < 0.5 * loss_first,
        "rss_flat_second_half": all(r["rss_growth_mib_second_half"] <= args.rss_slack_mib for r in rows),
        "heap_flat_second_half": None if rows[0]["heap_growth_mib_second_half"] is None else all(
            r["heap_growth_mib_second_half"] <= args.heap_slack_mib for r in rows),
        "held_rss_flat_20_to_end": None if rows[0]["held_rss_growth_mib_20_to_end"] is None else all(
            r["held_rss_growth_mib_20_to_end"] <= args.held_slack_mib for r in rows),
    }
    print(f"loss decreases: {passed['loss_decreases']}; on every rank: RSS growth over the second half "
          f"<= {args.rss_slack_mib} MiB: {passed['rss_flat_second_half']}, heap growth over the second half "
          f"<= {args.heap_slack_mib} MiB: {passed['heap_flat_second_half']}, held RSS growth 20->end "
          f"<= {args.held_slack_mib} MiB: {passed['held_rss_flat_20_to_end']}; wall {wall_s:.0f} s")
    stride = max(1, steps // 50)
    write_result(
        "soak", "cpu", vars(args), rows, world="dp 2 × sp 2", steps=steps, second_half=[mid, steps],
        wall_s=round(wall_s, 1),
        loss={"step_1": loss_first, "step_20": losses[19], "last_10_mean": loss_last,
              "stride": stride, "every_stride": losses[::stride]},
        passed=passed,
    )
    if not all(ok is not False for ok in passed.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""What `Trainer(strategy="seqpar")` costs over a plain torch loop at world size 1: the same
model, swapped to the same ring, the same data and AdamW; median step time of each.

    python benchmarks/strategy_overhead.py                       # CUDA: llama_125m shapes, 8K tokens
    python benchmarks/strategy_overhead.py --device cpu --d-model 128 --layers 2 --tokens 512 --steps 10

Prints a table and writes benchmarks/results/strategy_overhead_<device>.json. Target: the
Trainer's step <= 1.02 x the plain loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_seqpar  # noqa: E402,F401 - registers the strategy names
from benchmarks.common import card, write_result  # noqa: E402
from lightning_seqpar import SeqParStrategy  # noqa: E402
from lightning_seqpar.models.gpt import GPT, GPTConfig  # noqa: E402
from lightning_seqpar.swap import RingContext, swap_attention  # noqa: E402
from lightning_seqpar.swap.context import ring_context  # noqa: E402


class TokenBatches(torch.utils.data.Dataset):
    def __init__(self, steps, tokens, vocab, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (steps, tokens + 1), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


def loss_of(net, batch, device_type):
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        logits = net(batch["input_ids"], position_ids=batch.get("position_ids"))
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self._start = [], None

    def _sync(self, trainer):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, *args):
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._start)


class Module(L.LightningModule):
    def __init__(self, cfg):
        super().__init__()
        self.net = GPT(cfg)

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, batch, self.device.type)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def plain_loop(cfg, data, device, seed):
    torch.manual_seed(seed)
    net = GPT(cfg).to(device)
    swap_attention(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    times = []
    with ring_context(RingContext(group=None, algorithm="ring", layout="zigzag")):
        for batch in loader:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss_of(net, batch, device).backward()
            optimizer.step()
            optimizer.zero_grad()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def through_trainer(cfg, data, device, seed):
    torch.manual_seed(seed)
    module = Module(cfg)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=device, devices=1, strategy=SeqParStrategy(sp_size=1), max_epochs=1, callbacks=[timer],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    return timer.times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="alternate loop and Trainer this many times")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    cfg = GPTConfig(vocab_size=256, n_layer=a.layers, n_head=a.heads, d_model=a.d_model)
    data = TokenBatches(a.steps, a.tokens, cfg.vocab_size)
    warmup = max(3, a.steps // 5)
    loop_ms, trainer_ms = [], []
    for _ in range(a.rounds):  # alternating spreads drifts of the machine over both
        loop_ms += [1e3 * t for t in plain_loop(cfg, data, a.device, 0)[warmup:]]
        trainer_ms += [1e3 * t for t in through_trainer(cfg, data, a.device, 0)[warmup:]]
    loop, trainer = statistics.median(loop_ms), statistics.median(trainer_ms)
    print(f"# {card(a.device)} | torch {torch.__version__} | lightning {L.__version__} | GPT d={a.d_model} x {a.layers} layers, "
          f"{a.tokens} tokens, ring attention at world size 1")
    print(f"plain torch loop : {loop:8.2f} ms/step (median of {len(loop_ms)})")
    print(f"Trainer(seqpar)  : {trainer:8.2f} ms/step (median of {len(trainer_ms)})")
    print(f"ratio            : {trainer / loop:8.3f}  (target <= 1.02)")
    write_result("strategy_overhead", a.device, {k: v for k, v in vars(a).items() if k != "out"},
                 [{"plain_loop_ms": loop, "trainer_ms": trainer, "ratio": trainer / loop}], a.out)


if __name__ == "__main__":
    main()

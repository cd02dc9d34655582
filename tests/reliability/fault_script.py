"""Trains the tiny causal LM on 2 CPU processes under the script launcher (strategy "seqpar"
semantics: this script is re-run for rank 1) and misbehaves on purpose:

    python fault_script.py MODE OUT_DIR [CHECKPOINT]

MODE: "train" (3 epochs, no fault), "raise" (rank 1 raises in training_step at step 7),
"hang" (rank 1 sleeps in training_step at step 7, alive but never reaching the collective),
"kill" (rank 1 SIGKILLs itself at step 7, in epoch 2), "kill_launcher" (rank 0, which launched
rank 1, SIGKILLs itself at step 7), "kill_launcher_busy" (the same while rank 1 sleeps, far from
any collective), "resume" (3 epochs from CHECKPOINT).

4 optimizer steps per epoch (dp 1 × sp 2, 8 samples, batch 2), dropout on the logits, one
dataloader worker per rank. Checkpoints: OUT_DIR/epochs/last.ckpt at the end of each epoch,
OUT_DIR/steps/last.ckpt every 5 steps (step 5 is the first batch of epoch 2, two steps before
the fault). Every rank writes its pid to OUT_DIR/pid.RANK at the start of training and every
dataloader worker to OUT_DIR/worker.PID, so the test can check that none is left; rank 0 saves
the final parameters to OUT_DIR/params.pt."""

import functools
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_seqpar import SeqParStrategy
from tests.strategy.harness import quiet_trainer, snapshot
from tests.strategy.models import TinyCausalLM, lm_samples

FAULT_STEP = 7  # the third step of epoch 2: the epoch-1 and step-5 checkpoints exist
STEP_CHECKPOINT_EVERY = 5
# Long enough for the rendezvous (the same timeout bounds init_process_group) on a busy 2-core
# machine, where the second rank may need 10+ s to import torch and Lightning.
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


def record_worker(out: Path, worker_id: int) -> None:
    (out / f"worker.{os.getpid()}").write_text(str(os.getpid()))


class FaultyLM(TinyCausalLM):
    def __init__(self, mode: str, out: Path, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.out = mode, out

    def on_train_start(self):
        (self.out / f"pid.{self.global_rank}").write_text(str(os.getpid()))

    def train_dataloader(self):
        return DataLoader(
            self.train_data, batch_size=self.batch_size, num_workers=1,
            worker_init_fn=functools.partial(record_worker, self.out),
        )

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == FAULT_STEP:
            if self.mode == "raise":
                raise RuntimeError(f"original error: rank 1 failed at step {FAULT_STEP}")
            if self.mode in ("hang", "kill_launcher_busy"):
                time.sleep(600)
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        if self.global_rank == 0 and self.global_step == FAULT_STEP and self.mode.startswith("kill_launcher"):
            if self.mode == "kill_launcher_busy":
                time.sleep(1)  # rank 1 is asleep by now, far from any collective
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)

    def logits_and_labels(self, batch):
        # Dropout on the logits: the resumed run matches only if each rank's random state does.
        logits, labels = super().logits_and_labels(batch)
        return torch.nn.functional.dropout(logits, p=0.2, training=self.training), labels


def main(mode: str, out: str, checkpoint: str | None = None) -> None:
    out_dir = Path(out)
    torch.manual_seed(0)
    model = FaultyLM(mode, out_dir, reference=False, batch_size=2, train=lm_samples(8, 0), val=lm_samples(2, 1))
    callbacks = [
        ModelCheckpoint(dirpath=out_dir / "epochs", save_last=True, every_n_epochs=1),
        ModelCheckpoint(dirpath=out_dir / "steps", save_last=True, every_n_train_steps=STEP_CHECKPOINT_EVERY),
    ]
    trainer = quiet_trainer(
        devices=2, strategy=SeqParStrategy(sp_size=2, timeout=COLLECTIVE_TIMEOUT), max_epochs=3,
        limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True, deterministic=True,
    )
    trainer.fit(model, ckpt_path=checkpoint if mode == "resume" else None)
    if trainer.global_rank == 0:
        torch.save(snapshot(model), out_dir / "params.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])

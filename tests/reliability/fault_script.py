"""Trains the tiny causal LM on 2 CPU processes under the script launcher (strategy "seqpar"
semantics: this script is re-run for rank 1) and misbehaves on purpose:

    python fault_script.py MODE OUT_DIR

MODE: "train" (3 epochs, no fault), "raise" (rank 1 raises in training_step at step 4),
"hang" (rank 1 sleeps in training_step at step 4, alive but never reaching the collective),
"kill" (rank 1 SIGKILLs itself at step 4, in epoch 2), "resume" (3 epochs from OUT_DIR/last.ckpt).
Every rank writes its pid to OUT_DIR/pid.RANK at the start of training, so the test can check
that none is left; rank 0 saves the final parameters to OUT_DIR/params.pt. Checkpoints are
written at the end of each epoch (3 optimizer steps per epoch) to OUT_DIR/last.ckpt."""

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_seqpar import SeqParStrategy
from tests.strategy.harness import quiet_trainer, snapshot
from tests.strategy.models import TinyCausalLM, lm_samples

FAULT_STEP = 4  # the second step of epoch 2: epoch 1's checkpoint exists, epoch 2's doesn't
# Long enough for the rendezvous (the same timeout bounds init_process_group) on a busy 2-core
# machine, where the second rank may need 10+ s to import torch and Lightning.
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


class FaultyLM(TinyCausalLM):
    def __init__(self, mode: str, out: Path, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.out = mode, out

    def on_train_start(self):
        (self.out / f"pid.{self.global_rank}").write_text(str(os.getpid()))

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == FAULT_STEP:
            if self.mode == "raise":
                raise RuntimeError(f"original error: rank 1 failed at step {FAULT_STEP}")
            if self.mode == "hang":
                time.sleep(600)
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)

    def logits_and_labels(self, batch):
        # Dropout on the logits: the resumed run matches only if each rank's random state does.
        logits, labels = super().logits_and_labels(batch)
        return torch.nn.functional.dropout(logits, p=0.2, training=self.training), labels


def main(mode: str, out: str) -> None:
    out_dir = Path(out)
    torch.manual_seed(0)
    model = FaultyLM(mode, out_dir, reference=False, batch_size=2, train=lm_samples(6, 0), val=lm_samples(2, 1))
    checkpoints = ModelCheckpoint(dirpath=out_dir, save_last=True, every_n_epochs=1)
    trainer = quiet_trainer(
        devices=2, strategy=SeqParStrategy(sp_size=2, timeout=COLLECTIVE_TIMEOUT), max_epochs=3,
        limit_val_batches=0, callbacks=[checkpoints], enable_checkpointing=True, deterministic=True,
    )
    trainer.fit(model, ckpt_path=str(out_dir / "last.ckpt") if mode == "resume" else None)
    if trainer.global_rank == 0:
        torch.save(snapshot(model), out_dir / "params.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

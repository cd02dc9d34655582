"""`CausalLMModule`: the LightningModule of the main job, around the plain `GPT`.

Nothing here is sequence-parallel either. Two choices make it right under `SeqParStrategy`:
- the training loss is `lightning_seqpar.cross_entropy`, whose value is the global token mean
  and whose gradient, after DDP's averaging, is the single-device one (a per-chunk mean is not:
  chunks hold unequal numbers of labelled tokens, e.g. passkey labels sit in one chunk only);
- validation metrics keep *sums* (NLL, token counts, correct predictions), which add up
  exactly across chunks and replicas when torchmetrics syncs them; perplexity = exp(sum/count).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_seqpar.models.gpt import GPT, GPTConfig

IGNORE_INDEX = -100


def _global_cross_entropy():
    """`lightning_seqpar.cross_entropy` if the package has it, else None (imported lazily so
    this module works before, and independently of, the strategy)."""
    try:
        from lightning_seqpar import cross_entropy
    except ImportError:
        return None
    return cross_entropy


class LMOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor


class CausalLMModule(L.LightningModule):
    """Causal LM training: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`.

    net: the fields of `GPTConfig` (a plain dict, so checkpoints hold no custom classes).
    Batches are dicts with `input_ids`, `labels` (already shifted), and optionally
    `position_ids` and `attention_mask`, all `[B, L]` (`[B, L_local]` under sequence parallelism).
    """

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = GPTConfig(**dict(net or {}))
        self.model = GPT(self.config)
        vocab = self.config.vocab_size
        self.val_nll_sum = SumMetric()
        self.val_tokens = SumMetric()
        self.val_acc = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX)
        self._loss_fn = None

    # ---- model -------------------------------------------------------------------------

    def forward(self, input_ids, position_ids=None, labels=None, attention_mask=None) -> LMOutput:
        logits = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask)
        loss = None if labels is None else self.loss(logits, labels)
        return LMOutput(loss, logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean cross entropy over every labelled token of the global batch."""
        if self._loss_fn is None:
            self._loss_fn = _global_cross_entropy()
            if self._loss_fn is None:
                rank_zero_warn(
                    "lightning_seqpar.cross_entropy is not available: using F.cross_entropy, "
                    "which is right on one device but not under sequence parallelism."
                )
                self._loss_fn = _local_cross_entropy
        return self._loss_fn(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def _step(self, batch) -> LMOutput:
        return self(
            batch["input_ids"], batch.get("position_ids"), batch["labels"], batch.get("attention_mask")
        )

    # ---- loops -------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        loss = self._step(batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self._step(batch).logits.float()
        labels = batch["labels"]
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        self.val_nll_sum.update(nll)
        self.val_tokens.update((labels != IGNORE_INDEX).sum())
        self.val_acc.update(logits.flatten(0, 1), labels.flatten())

    def on_validation_epoch_end(self):
        # compute() sums the states over all processes: every chunk of every sample counted once.
        nll_sum, tokens = self.val_nll_sum.compute(), self.val_tokens.compute()
        mean_nll = nll_sum / tokens.clamp(min=1)
        # The values are already global and equal on every rank; sync_dist's mean leaves them
        # unchanged (and tells Lightning they are safe to monitor).
        self.log_dict(
            {"val/loss": mean_nll, "val/ppl": mean_nll.exp(), "val/acc": self.val_acc.compute()},
            prog_bar=True, sync_dist=True,
        )
        for metric in (self.val_nll_sum, self.val_tokens, self.val_acc):
            metric.reset()

    def predict_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch.get("position_ids"), None, batch.get("attention_mask")).logits

    # ---- optimisation ------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        # No weight decay on norms (1-D parameters); the tied embedding is decayed once.
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = min(hp.warmup_steps, total)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _local_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)

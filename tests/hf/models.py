"""Tiny transformers causal LMs (built from configs, no downloads) in `HFCausalLMModule`, and
right-padded data whose chunks hold unequal numbers of valid tokens."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_seqpar.integrations.hf import HFCausalLMModule

VOCAB, SEQ_LEN, IGNORE = 128, 16, -100
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, tie_word_embeddings=False,
)
FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=4, **_COMMON),  # multi-head
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **_COMMON),  # grouped-query, q/k/v biases
    # A sliding window as long as the sequence: configured, and exactly full causal attention.
    "mistral": dict(model_type="mistral", num_key_value_heads=1, sliding_window=SEQ_LEN, **_COMMON),
    # A window shorter than the sequence: no ring computes it; it must be refused.
    "mistral_window": dict(model_type="mistral", num_key_value_heads=1, sliding_window=4, **_COMMON),
}


def right_padded(n: int, seed: int) -> list[dict]:
    """Sequences of 3..SEQ_LEN real tokens, right-padded; labels shifted on the whole sequence."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for length in torch.randint(3, SEQ_LEN + 1, (n,), generator=gen).tolist():
        ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=gen)
        labels = torch.full((SEQ_LEN,), IGNORE, dtype=torch.long)
        labels[: length - 1] = ids[1:length]
        mask = torch.zeros(SEQ_LEN, dtype=torch.long)
        mask[:length] = 1
        samples.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return samples


class Recorded(HFCausalLMModule):
    """Records every training loss and the gradients of the first optimizer step (after DDP's
    averaging), and predicts logits."""

    def __init__(self, family: str, reference: bool, batch_size: int, n_train: int, n_predict: int, **kwargs):
        torch.manual_seed(0)  # the same initial weights in every process and run
        super().__init__(hf_config=FAMILIES[family], lr=1e-3, weight_decay=0.01, warmup_steps=0, **kwargs)
        for name, param in self.model.named_parameters():
            # A key bias adds the same score to every key of a query: softmax cancels it, its
            # exact gradient is 0, and AdamW would turn any rounding noise into lr-sized steps.
            if name.endswith("k_proj.bias"):
                param.requires_grad_(False)
        self.reference, self.batch_size = reference, batch_size
        self.train_data, self.predict_data = right_padded(n_train, 0), right_padded(n_predict, 1)
        self.train_losses: list[float] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.train_losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.first_grads is None:
            self.first_grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def train_dataloader(self):
        if self.reference:
            # What Lightning does under any distributed strategy (shuffle=True, seed 0).
            sampler = DistributedSampler(self.train_data, num_replicas=1, rank=0, shuffle=True)
            return DataLoader(self.train_data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(self.train_data, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.predict_data, batch_size=len(self.predict_data))


class CallsWithLabels(Recorded):
    """Asks the transformers model for its own loss: must be refused under the strategy."""

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

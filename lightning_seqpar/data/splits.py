"""The loaders both data modules share."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader


class TrainValDataModule(L.LightningDataModule):
    """A data module whose `setup` fills `train_set` and `val_set`, and whose hyperparameters
    hold `batch_size` and `num_workers`. Training batches are shuffled and the ragged last
    batch is dropped, so every step sees full sequences of the same shape."""

    train_set = None
    val_set = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
            num_workers=self.hparams.num_workers, drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

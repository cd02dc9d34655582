"""The main job: Hydra-configured causal LM training with sequence parallelism.

    python examples/train.py                                   # 2 CPU processes, sp_size 2
    python examples/train.py strategy=single                   # one process, whole sequences
    python examples/train.py data=passkey data.seq_len=8192 trainer=gpu model=llama_125m
    python examples/train.py -m strategy=seqpar_spawn model.lr=1e-3,3e-3

Configuration lives in `configs/`; every field can be overridden from the command line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

import lightning_seqpar  # noqa: F401 - registers the strategy names and the config resolvers

# Lightning's subprocess launcher starts ranks 1..N-1 by re-running this script with the
# parent's command line plus `hydra.run.dir=<the run dir pattern>`. Under `-m` that command
# line still says "multirun" with the whole sweep, so every child would run all jobs of the
# sweep in directories of its own. Rank 0 therefore leaves the exact arguments of the job
# (its overrides, its resolved output directory) in this variable before the launch, and a
# child replaces its argv with them before Hydra parses anything.
CHILD_ARGS_ENV = "LIGHTNING_SEQPAR_HYDRA_CHILD_ARGS"
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _adopt_parent_job_args() -> None:
    if "LOCAL_RANK" in os.environ and CHILD_ARGS_ENV in os.environ:
        rank = os.environ["LOCAL_RANK"]
        sys.argv = [sys.argv[0], *json.loads(os.environ[CHILD_ARGS_ENV]), f"hydra.job.name=rank{rank}"]


def _publish_job_args_for_children() -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir.replace("\\", "/")
    os.environ[CHILD_ARGS_ENV] = json.dumps(
        [*hydra_cfg.overrides.task, f'hydra.run.dir="{run_dir}"', "hydra.output_subdir=null"]
    )


class RunSummary(Callback):
    """Measures training throughput and peak memory on every rank; rank 0 prints the summary.

    Tokens are counted as each rank's local `input_ids` (its chunk under sequence parallelism)
    summed over all ranks, i.e. the tokens of the global batch. The first step is not timed.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.tokens, self.seconds, self.steps = 0, 0.0, 0
        self.val_step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.steps += 1
        if self.steps > 1:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += batch["input_ids"].numel()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        # Collectives: every rank reaches this hook.
        device = pl_module.device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            kind = "GPU memory allocated"
        else:
            # ru_maxrss is in KiB on Linux, bytes on macOS.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            kind = "resident memory"
        tokens = trainer.strategy.reduce(torch.tensor(float(self.tokens), device=device), reduce_op="sum")
        seconds = trainer.strategy.reduce(torch.tensor(self.seconds, device=device), reduce_op="max")
        peaks = torch.zeros(trainer.world_size, dtype=torch.float64, device=device)
        peaks[trainer.global_rank] = peak
        peaks = trainer.strategy.reduce(peaks, reduce_op="sum")  # every rank's peak, on every rank
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        lines = [
            "",
            "=" * 72,
            f"strategy {type(trainer.strategy).__name__}, {trainer.world_size} process(es), "
            f"{trainer.global_step} optimizer steps",
            f"throughput: {tokens.item() / max(seconds.item(), 1e-9):,.0f} tokens/s "
            f"(global batch, steps 2..{self.steps})",
            f"peak {kind} per rank: " + ", ".join(f"{p / 2**30:.2f} GiB" for p in peaks.tolist()),
        ]
        if "val/ppl" in metrics:
            acc = metrics.get("val/acc")
            lines.append(
                f"validation at step {self.val_step}: perplexity {metrics['val/ppl'].item():.3f}, "
                f"loss {metrics['val/loss'].item():.4f}"
                + ("" if acc is None else f", accuracy {acc.item():.3f}")
            )
        if "train/loss" in metrics:
            lines.append(f"last train loss: {metrics['train/loss'].item():.4f}")
        lines += [f"outputs: {self.output_dir}", "=" * 72]
        print("\n".join(lines), flush=True)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(c) for c in (group or {}).values() if c is not None]


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    _publish_job_args_for_children()

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy)
    callbacks = [*_instantiate_all(cfg.callbacks), RunSummary(cfg.output_dir)]
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=_instantiate_all(cfg.logger), callbacks=callbacks)

    if trainer.is_global_zero:
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {params / 1e6:.2f}M parameters; run directory: {cfg.output_dir}")
    # A multirun runs its jobs one after another in this process. Lightning's launcher leaves
    # LOCAL_RANK=0 etc. in the environment, which tells the next job's launcher that processes
    # are "created externally" (so it would start no ranks), and the process group alive.
    launch_env = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in launch_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    val_loss = trainer.callback_metrics.get("val/loss")
    return None if val_loss is None else float(val_loss)


if __name__ == "__main__":
    _adopt_parent_job_args()
    main()

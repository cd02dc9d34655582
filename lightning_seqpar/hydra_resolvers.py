"""OmegaConf resolvers that let one Hydra config pick the hardware it finds, so the main job's
plain command trains on the GPUs of a GPU machine and on two CPU processes elsewhere.

    accelerator: ${seqpar_accelerator:}   # "cuda" or "cpu"
    devices: ${seqpar_devices:2}          # every GPU, or the given number of CPU processes
    precision: ${seqpar_precision:}       # "bf16-mixed" on GPUs that support it, else "32-true"
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def accelerator() -> str:
    return "cuda" if _cuda() else "cpu"


def devices(cpu_processes: int = 2) -> int:
    return torch.cuda.device_count() if _cuda() else int(cpu_processes)


def precision() -> str:
    return "bf16-mixed" if _cuda() and torch.cuda.is_bf16_supported() else "32-true"


def register() -> None:
    for name, fn in (("seqpar_accelerator", accelerator), ("seqpar_devices", devices), ("seqpar_precision", precision)):
        OmegaConf.register_new_resolver(name, fn, replace=True)

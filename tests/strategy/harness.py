"""Running a Trainer on every rank of a test process pool, and comparing results.

The pool's processes already hold a gloo world; with LOCAL_RANK set, Lightning treats them as
launched externally (like torchrun) and joins that world instead of starting processes."""

from __future__ import annotations

import os

import lightning as L
import torch
import torch.distributed as dist

TOLERANCE = 1e-5  # relative Frobenius error per parameter tensor / loss, float32


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def join_pool_world() -> tuple[int, int]:
    """Make Lightning see this pool process as rank `dist.get_rank()` of an external launch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    return rank, world


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_same_parameters(got: dict, expected: dict, tolerance: float = TOLERANCE) -> None:
    assert got.keys() == expected.keys()
    errors = {k: relative_error(got[k], expected[k]) for k in expected if expected[k].is_floating_point()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst}: relative error {errors[worst]:.2e} > {tolerance:.0e}"


def assert_close_values(got: list[float], expected: list[float], tolerance: float = TOLERANCE) -> None:
    assert len(got) == len(expected), (got, expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= tolerance * max(abs(b), 1e-3), f"value {i}: {a} vs {b}"

"""When the strategy moves the attention ops' input checks to a gloo twin of its sp group (the
twin itself, and the checks through it, are tested in tests/ops/test_check_group.py)."""

from __future__ import annotations

import torch.distributed as dist

from lightning_seqpar.strategy import CPU_CHECKS_ENV, checks_on_a_cpu_twin


def test_twin_only_for_a_device_backend_with_a_group(monkeypatch):
    monkeypatch.delenv(CPU_CHECKS_ENV, raising=False)
    assert checks_on_a_cpu_twin(2, dist.Backend.NCCL) is True
    assert checks_on_a_cpu_twin(8, "nccl") is True
    # gloo checks on the CPU already; a group of one has nothing to check across.
    assert checks_on_a_cpu_twin(2, dist.Backend.GLOO) is False
    assert checks_on_a_cpu_twin(1, dist.Backend.NCCL) is False


def test_environment_switch_keeps_checks_on_the_sp_group(monkeypatch):
    monkeypatch.setenv(CPU_CHECKS_ENV, "0")
    assert checks_on_a_cpu_twin(2, dist.Backend.NCCL) is False
    monkeypatch.setenv(CPU_CHECKS_ENV, "1")
    assert checks_on_a_cpu_twin(2, dist.Backend.NCCL) is True


def test_no_twin_without_gloo(monkeypatch):
    monkeypatch.delenv(CPU_CHECKS_ENV, raising=False)
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    assert checks_on_a_cpu_twin(2, dist.Backend.NCCL) is False

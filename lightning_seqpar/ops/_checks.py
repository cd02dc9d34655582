"""Input validation for the sequence-parallel attention ops, raised on every rank.

A problem seen by one rank alone (its own bad dtype, or a local length that differs from its
peers') must not leave the other ranks waiting in the ring forever. Each rank encodes what it
sees into a small integer record, the group all-gathers the records once, and every rank raises
the same error. The cost is one tiny collective per call; `set_input_checks(False)` removes it
once a model is known to be well formed (benchmarks do this).

Reading the records back from an NCCL all-gather makes the host wait for the GPU at every
attention call, so the CPU can no longer queue kernels ahead of it. `register_check_group`
names a CPU (gloo) group over the same ranks to run the check through instead; the strategy
registers one for its sequence-parallel group on NCCL.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from lightning_seqpar.ops._comm import all_gather_rows, collective_device
from lightning_seqpar.ops._pieces import check_layout, pieces_per_rank

_ENABLED = True

# Codes of problems a rank can see locally. Indices into _LOCAL_PROBLEMS.
_LOCAL_PROBLEMS = (
    None,
    "q, k and v must be 4-D tensors [B, H, L_local, D]",
    "q, k and v must share one dtype",
    "q, k and v must be on one device",
    "k and v must have the same shape",
    "q and k/v disagree on batch size, local length or head dim",
    "the number of query heads must be a multiple of the number of key/value heads",
    "key_padding_mask must be a bool tensor [B, L_local] on the device of k",
    "attention ops support floating point inputs only",
    "the local length must be even for the 'zigzag' layout",
    "a local length of zero: every rank must hold at least one token",
)

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# Process-wide settings that decide what an op computes or sends, so that ranks holding
# different values would post mismatched transfers (a hang, or blocks of the wrong size): the
# name of the function that sets each -> a reader returning it as an integer. The records carry
# them, and a disagreement raises on every rank like any other. Registered at import, so every
# rank's record has the same length.
_SHARED_SETTINGS: dict[str, Callable[[], int]] = {}


def register_shared_setting(setter_name: str, read: Callable[[], int]) -> None:
    """Check at every call that all ranks of the group hold the same value of the setting that
    `setter_name` sets (`read()` gives it as an integer)."""
    _SHARED_SETTINGS[setter_name] = read


def set_input_checks(enabled: bool) -> None:
    """Turn the cross-rank input check of every attention call on (default) or off."""
    global _ENABLED
    _ENABLED = bool(enabled)


def input_checks_enabled() -> bool:
    return _ENABLED


# Attention group -> CPU group over the same ranks that checks its calls' inputs.
_CHECK_GROUPS: dict = {}


def _key(group):
    return dist.group.WORLD if group is None else group


def register_check_group(group, cpu_group) -> None:
    """Check the inputs of attention calls on `group` (None = the world) through `cpu_group`, a
    gloo group over the same ranks: no host-device synchronisation per call. `cpu_group=None`
    removes the registration."""
    if cpu_group is None:
        _CHECK_GROUPS.pop(_key(group), None)
        return
    if dist.get_backend(cpu_group) != dist.Backend.GLOO:
        raise ValueError(f"the check group must be a gloo (CPU) group, got backend {dist.get_backend(cpu_group)!r}")
    ranks, cpu_ranks = dist.get_process_group_ranks(_key(group)), dist.get_process_group_ranks(cpu_group)
    if ranks != cpu_ranks:
        raise ValueError(f"the check group must hold the group's ranks in the same order: {ranks} != {cpu_ranks}")
    _CHECK_GROUPS[_key(group)] = cpu_group


def check_groups_for_rows(mesh, timeout=None):
    """A gloo group over the ranks of every row of a 2-D `mesh` (the rows are the groups of its
    last dim, e.g. the sequence-parallel groups of a ("dp", "sp") mesh); returns this rank's.
    Every rank must call this, in the same order: each `new_group` is a collective of the
    whole world."""
    mine = None
    kwargs = {} if timeout is None else {"timeout": timeout}
    for ranks in mesh.mesh.tolist():
        group = dist.new_group(ranks, backend="gloo", **kwargs)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def check_group(group):
    """The group an attention call on `group` is checked through."""
    return _CHECK_GROUPS.get(_key(group), group)


def _local_problem(q, k, v, key_padding_mask, layout) -> int:
    tensors = (q, k, v)
    if any(t.dim() != 4 for t in tensors):
        return 1
    if not all(t.is_floating_point() for t in tensors):
        return 8
    if len({t.dtype for t in tensors}) != 1:
        return 2
    if len({t.device for t in tensors}) != 1:
        return 3
    if k.shape != v.shape:
        return 4
    if q.size(0) != k.size(0) or q.size(2) != k.size(2) or q.size(3) != k.size(3):
        return 5
    if q.size(1) % k.size(1) != 0:
        return 6
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool
        or tuple(key_padding_mask.shape) != (k.size(0), k.size(2))
        or key_padding_mask.device != k.device
    ):
        return 7
    if q.size(2) == 0:
        return 10
    if q.size(2) % pieces_per_rank(layout) != 0:
        return 9
    return 0


def _record(q, k, v, key_padding_mask, layout) -> list[int]:
    problem = _local_problem(q, k, v, key_padding_mask, layout)
    shape = list(q.shape) + [k.size(1)] if problem == 0 else [0] * 5
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    return [problem, *shape, dtype, int(key_padding_mask is not None), *(read() for read in _SHARED_SETTINGS.values())]


_INPUTS = slice(1, 8)  # the record's shape, dtype and mask presence; the shared settings follow


def _describe(record: list[int]) -> str:
    b, hq, length, d, hkv = record[1:6]
    return f"B={b} Hq={hq} Hkv={hkv} L_local={length} D={d} dtype={_DTYPES[record[6]]} mask={bool(record[7])}"


def check_attention_inputs(q, k, v, *, group, layout: str, key_padding_mask, dropout_p: float) -> None:
    """Validate the inputs of one attention call; raise the same ValueError on every rank."""
    check_layout(layout)
    if dropout_p:
        raise ValueError(
            f"attention dropout (dropout_p={dropout_p}) is not supported by the sequence-parallel "
            f"ops: set dropout_p=0.0 (dropout on the attention output is fine)"
        )
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if not distributed:
        problem = _local_problem(q, k, v, key_padding_mask, layout)
        if problem:
            raise ValueError(_LOCAL_PROBLEMS[problem])
        return
    if not _ENABLED:
        return
    mine = torch.tensor(_record(q, k, v, key_padding_mask, layout), dtype=torch.int64)
    through = check_group(group)
    records = all_gather_rows(mine.to(collective_device(through)).unsqueeze(0), through).squeeze(1).tolist()
    bad = [(rank, rec[0]) for rank, rec in enumerate(records) if rec[0]]
    if bad:
        details = "; ".join(f"rank {rank}: {_LOCAL_PROBLEMS[code]}" for rank, code in bad)
        raise ValueError(f"sequence-parallel attention got bad inputs ({details})")
    settings = [(name, [rec[_INPUTS.stop + i] for rec in records]) for i, name in enumerate(_SHARED_SETTINGS)]
    differing = [(name, values) for name, values in settings if len(set(values)) > 1]
    if differing:
        details = "; ".join(f"{name}: " + ", ".join(f"rank {rank} {value}" for rank, value in enumerate(values))
                            for name, values in differing)
        raise ValueError(
            "sequence-parallel attention needs the same settings on every rank of the group: call "
            f"these with the same value on every rank ({details})"
        )
    if any(rec[_INPUTS] != records[0][_INPUTS] for rec in records):
        table = "; ".join(f"rank {rank}: {_describe(rec)}" for rank, rec in enumerate(records))
        raise ValueError(
            "sequence-parallel attention needs the same batch, heads, head dim, dtype, mask "
            "presence and local length on every rank of the group (cut the global sequence into "
            f"equal chunks with lightning_seqpar.layout.shard_sequence); got {table}"
        )

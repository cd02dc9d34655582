"""Input checks through a registered CPU group: the same errors on every rank, through the
registered group and not the attention group, and the same results when the inputs are good."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_seqpar.ops import _checks, ring_attention


def _inputs(length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, length, 8, generator=gen, dtype=torch.float64) for _ in range(3)]


class _GroupSpy:
    """Records which group each input check's all-gather ran on."""

    def __init__(self):
        self.groups = []
        self._original = _checks.all_gather_rows

    def __enter__(self):
        def gather(local, group):
            self.groups.append(group)
            return self._original(local, group)

        _checks.all_gather_rows = gather
        return self

    def __exit__(self, *exc):
        _checks.all_gather_rows = self._original


def bad_length_through_check_group():
    """Rank 1 holds a longer chunk; the check runs through a registered gloo twin of the world."""
    twin = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    _checks.register_check_group(None, twin)
    try:
        with _GroupSpy() as spy:
            try:
                ring_attention(*_inputs(4 if dist.get_rank() == 0 else 6))
            except ValueError as exc:
                return str(exc), [g is twin for g in spy.groups]
        return None, [g is twin for g in spy.groups]
    finally:
        _checks.register_check_group(None, None)


def test_bad_inputs_raise_on_every_rank_through_the_check_group(process_pools):
    for message, through_twin in process_pools(2).run_ok(bad_length_through_check_group):
        assert message is not None and "same batch, heads, head dim, dtype, mask presence and local length" in message
        assert through_twin == [True]


def mesh_rows_as_check_groups():
    """A 2 x 2 (dp x sp) mesh: its sp groups' gloo twins, registered; ring attention on the sp
    group gives the same output as without the twin."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    sp_group = mesh.get_group("sp")
    twin = _checks.check_groups_for_rows(mesh)
    ranks = dist.get_process_group_ranks(twin)
    q, k, v = _inputs(4, seed=dist.get_rank() // 2)
    without = ring_attention(q, k, v, group=sp_group, causal=True)
    _checks.register_check_group(sp_group, twin)
    try:
        with _GroupSpy() as spy:
            through = ring_attention(q, k, v, group=sp_group, causal=True)
        used_twin = [g is twin for g in spy.groups]
    finally:
        _checks.register_check_group(sp_group, None)
    return ranks, dist.get_process_group_ranks(sp_group), used_twin, torch.equal(without, through)


def test_check_groups_follow_the_mesh_rows(process_pools):
    for rank, (twin_ranks, sp_ranks, used_twin, same) in enumerate(process_pools(4).run_ok(mesh_rows_as_check_groups)):
        assert twin_ranks == sp_ranks == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert used_twin == [True] and same


def register_other_ranks():
    """A check group over other ranks than the attention group's is refused."""
    pair = dist.new_group([0, 1], backend="gloo")
    if dist.get_rank() > 1:
        return None
    try:
        _checks.register_check_group(None, pair)
    except ValueError as exc:
        return str(exc)
    _checks.register_check_group(None, None)
    return None


def test_a_check_group_of_other_ranks_is_refused(process_pools):
    messages = process_pools(4).run_ok(register_other_ranks)
    assert all("same order" in m for m in messages[:2]), messages

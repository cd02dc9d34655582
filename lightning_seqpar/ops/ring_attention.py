"""Ring attention with online softmax: O(L_local) memory per rank.

Each rank keeps its queries; every rank's key/value block visits every rank, fetched straight
from its owner two steps before it is used (`_comm.ring_visit`'s direct walk). At every step
one fused block kernel returns (out_b, lse_b) for the visiting block, and the blocks' results
are merged in float32 (a few at a time: `_merge.MergedOutput`). The backward walks the ring
again, K and V laid out sequence-major, each owner sending only the rows its visitor reads,
four blocks per visit into one buffer where one block call can read them together
(`set_backward_blocks_per_call`): each block's gradient is
computed from the *global* out and lse, dQ accumulates at home, and each rank's dK/dV partials
for the visiting blocks are sent straight to their owners, which sum them a few at a time
(`_merge.SummedRows`; `_comm.ring_visit_sending_home`). No tensor spans L_local x L.
"""

from __future__ import annotations

import functools

import torch

from lightning_seqpar.ops._blocks import RowRanges, backward_rows, block_forward, finish_lse_, key_bias, row_view
from lightning_seqpar.ops._checks import register_shared_setting
from lightning_seqpar.ops._comm import Ring, ring_visit, ring_visit_sending_home, step_groups
from lightning_seqpar.ops._common import expand_heads, gather_key_padding_masks, lse_attention_function, prepare, reduce_heads, stack_kv
from lightning_seqpar.ops._graphs import clear_cuda_graphs, graphed
from lightning_seqpar.ops._kernels import block_grad_dtype, head_expansion, select_block_kernel
from lightning_seqpar.ops._merge import MergedOutput, SummedRows
from lightning_seqpar.ops._pieces import buffer_rows, causal_step_tasks, visit_plan

@functools.lru_cache(maxsize=4096)
def _step_tasks(rank: int, owner: int, size: int, local_len: int, layout: str, causal: bool) -> tuple:
    # Cached: the ring asks for the same few plans at every step of every layer.
    return tuple(causal_step_tasks(rank, owner, size, local_len, layout, causal))


def _block_tasks(ring: Ring, owner: int, local_len: int, layout: str, causal: bool) -> tuple:
    return _step_tasks(ring.rank, owner, ring.size, local_len, layout, causal)


def ring_attention_forward(q, k, v, ring: Ring, masks, *, causal, scale, layout):
    """Returns the local output (dtype of q) and its lse (`[B, Hq, L_local]`, float32/64;
    +inf on rows that see no key at all, so their backward is zero)."""
    local_len = q.size(2)
    kernel = select_block_kernel(q, masks is not None)
    groups = head_expansion(kernel, q, k)
    merged = MergedOutput(q, kernel)
    q_rows = RowRanges(q)

    def visit(owner: int, kv: torch.Tensor) -> None:
        for task in _block_tasks(ring, owner, local_len, layout, causal):
            block_out, block_lse = block_forward(
                kernel, q_rows(task.q),
                expand_heads(row_view(kv[0], task.k), groups),
                expand_heads(row_view(kv[1], task.k), groups),
                scale=scale, causal=task.causal, key_mask=None if masks is None else masks[owner][:, task.k],
            )
            merged.add(task.q, block_out, block_lse)

    ring_visit(ring, stack_kv(k, v), visit)
    out, lse = merged.result()
    finish_lse_(lse)
    return out, lse


# Blocks that one backward visit gives to one block call where their key rows allow (see
# `_pieces.visit_plan`). A block kernel's backward spends a fixed share of every call on the
# query rows (their dO.O and the float32 dQ it accumulates), so fewer, longer calls pay it less
# often. The price is held K/V and dK/dV. Replayed on an H100 (simulated N = 8, 4K and 8K tokens
# per rank, 2026-11-26): 2 took 0.952-0.991 of 1's forward+backward time
# (benchmarks/results/backward_blocks_per_call_h100.txt), and 4, with the gradients' partials
# folded eight at a time (`_merge.GRADIENT_PARTS_PER_FOLD`), 0.960-0.997 of 2 with four
# (benchmarks/results/gradient_folds_h100.txt, two machines). One rank's attention peak at
# L = 16K: 204 / 228 / 260 MiB at 1 / 2 / 4 (the last with eight parts per fold).
BLOCKS_PER_BACKWARD_CALL = 4


def set_backward_blocks_per_call(blocks: int) -> None:
    """Visiting blocks that the ring's backward gives to one block call where their key rows
    allow (default 4; 1 uses each block as soon as it lands). More blocks per call means fewer,
    longer kernel calls, and more K/V blocks held with their dK/dV waiting to be sent (see
    `BLOCKS_PER_BACKWARD_CALL`). Drops captured CUDA graphs, since a captured backward keeps
    the value it was captured with."""
    global BLOCKS_PER_BACKWARD_CALL
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"set_backward_blocks_per_call takes a whole number of blocks, at least 1; got {blocks!r}")
    BLOCKS_PER_BACKWARD_CALL = blocks
    clear_cuda_graphs()


def backward_blocks_per_call() -> int:
    """The value `set_backward_blocks_per_call` set."""
    return BLOCKS_PER_BACKWARD_CALL


# Every rank's backward must group its steps alike, or their transfers won't match.
register_shared_setting("set_backward_blocks_per_call", backward_blocks_per_call)


@functools.lru_cache(maxsize=4096)
def _visit_plan(rank: int, steps: tuple, size: int, local_len: int, layout: str, causal: bool) -> tuple:
    return visit_plan(rank, steps, size, local_len, layout, causal)


@functools.lru_cache(maxsize=4096)
def _read_segments(reader: int, step: int, size: int, local_len: int, layout: str, causal: bool, per_visit: int) -> tuple:
    """The segments of the block of `step` that `reader` reads, in the order it reads them."""
    steps = next(g for g in step_groups(size, per_visit) if step in g)
    block = steps.index(step)
    calls = _visit_plan(reader, steps, size, local_len, layout, causal)[1]
    return tuple(seg for call in calls for seg in call.segments if seg.block == block)


def sequence_major(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` as `[L, B, H, D]` (a view): how K/V and their gradients travel in the
    backward, so that any range of rows is one contiguous piece of memory."""
    return x.permute(2, 0, 1, 3)


def from_sequence_major(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def ring_attention_backward(dout, q, k, v, out, lse, ring: Ring, masks, *, causal, scale, layout):
    local_len = q.size(2)
    kernel = select_block_kernel(q, masks is not None)
    groups = head_expansion(kernel, q, k)
    # Partials travel in the dtype the kernel returns them in and are summed at home in the
    # accumulation dtype, as if they had been added there one by one.
    wire = block_grad_dtype(kernel, q.dtype)
    dq, dk, dv = SummedRows(q, kernel), SummedRows(k, kernel), SummedRows(v, kernel)
    q_rows, lse_rows, dout_rows, out_rows = backward_rows(kernel, q, lse, dout, out)
    # This rank's K and V sequence-major: any range of rows is one contiguous piece to send,
    # and a visit's buffer holds its blocks' rows in the order of its plan
    # (`_pieces.visit_plan`); the kernels read K/V rows of it as views and return dK/dV laid out
    # as K/V, so that a block's rows of them are sent home without a copy.
    local = torch.empty((2, local_len, *k.shape[:2], k.size(3)), dtype=k.dtype, device=k.device)
    local[0].copy_(sequence_major(k))
    local[1].copy_(sequence_major(v))

    def plan(reader: int, steps: tuple) -> tuple:
        return _visit_plan(reader, steps, ring.size, local_len, layout, causal)

    def read(reader: int, step: int) -> tuple:
        """The segments of the block of `step` that `reader` reads: what its owner sends (only
        those rows: under zigzag, half of a block whose owner comes before the reader) and
        what the reader sends back as partial gradients."""
        return _read_segments(reader, step, ring.size, local_len, layout, causal, BLOCKS_PER_BACKWARD_CALL)

    def send(step: int) -> list:
        segments = read(ring.visitor(step), step)
        return [row_view(local[t], seg.local, dim=0) for t in range(2) for seg in segments]

    def receive(steps: tuple) -> tuple:
        rows = buffer_rows(plan(ring.rank, steps)[1])
        buffer = torch.empty((2, rows, *local.shape[2:]), dtype=k.dtype, device=k.device)
        recvs = [[row_view(buffer[t], seg.buffer, dim=0) for t in range(2) for seg in read(ring.rank, step)] for step in steps]
        return buffer, recvs

    def key_mask(steps: tuple, call) -> torch.Tensor | None:
        if masks is None:
            return None
        return torch.cat([masks[ring.owner(steps[seg.block])][:, seg.local] for seg in call.segments], dim=1)

    def visit(steps: tuple, buffer) -> list:
        # The own block is K and V as the caller gave them; it lies in its buffer as it is.
        keys, values = (k, v) if buffer is None else (from_sequence_major(buffer[0]), from_sequence_major(buffer[1]))
        parts = [[] for _ in steps]
        for call in plan(ring.rank, steps)[1]:
            dq_b, dk_b, dv_b = kernel.backward(
                dout_rows(call.q), q_rows(call.q),
                expand_heads(row_view(keys, call.k), groups),
                expand_heads(row_view(values, call.k), groups),
                out_rows(call.q), lse_rows(call.q),
                scale=scale, causal=call.causal, bias=key_bias(key_mask(steps, call), q.dtype),
            )
            dq.add(call.q, dq_b)
            dk_b, dv_b = (sequence_major(reduce_heads(g, groups).to(wire)) for g in (dk_b, dv_b))
            for seg in call.segments:
                rows = slice(seg.buffer.start - call.k.start, seg.buffer.stop - call.k.start)
                parts[seg.block].append((seg.local, (row_view(dk_b, rows, dim=0), row_view(dv_b, rows, dim=0))))
        return parts

    def expected(visitor: int, step: int) -> list:
        """Empty parts shaped as the partials that `visitor` computes for this rank's block at
        `step`, in the order it sends them."""
        shape = (k.size(0), k.size(1), k.size(3))
        return [(seg.local, tuple(torch.empty((seg.local.stop - seg.local.start, *shape), dtype=wire, device=k.device)
                                  for _ in range(2)))
                for seg in read(visitor, step)]

    def arrived(parts: list) -> None:
        for rows, (dk_part, dv_part) in parts:
            dk.add(rows, from_sequence_major(dk_part))
            dv.add(rows, from_sequence_major(dv_part))

    ring_visit_sending_home(ring, send, receive, visit, expected, arrived, steps_per_visit=BLOCKS_PER_BACKWARD_CALL)
    return dq.result(), dk.result(), dv.result()


def _rank_masks(key_padding_mask, ring: Ring, layout: str):
    return gather_key_padding_masks(key_padding_mask, ring)


_RingAttention = lse_attention_function("_RingAttention", _rank_masks, graphed(ring_attention_forward), graphed(ring_attention_backward))


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Exact attention over a sequence cut across the ranks of `group`, O(L_local) memory.

    q: `[B, Hq, L_local, D]`, k, v: `[B, Hkv, L_local, D]` with Hq % Hkv == 0 (K/V travel with
    Hkv heads). `layout` says how the global sequence was cut across the group's ranks (rank
    order); `key_padding_mask` `[B, L_local]` bool, True = a real token, sharded like k.
    Returns the local output `[B, Hq, L_local, D]`. Rows that see no real key give zeros, as
    `F.scaled_dot_product_attention` does.
    """
    q, k, v, scale = prepare(q, k, v, group=group, scale=scale, layout=layout, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return _RingAttention.apply(q, k, v, key_padding_mask, group, causal, scale, layout)

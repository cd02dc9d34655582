"""CUDA graphs for an op's passes: the host out of the ring's loop where chunks are short.

At a few thousand tokens per rank a ring step runs for 100-200 us on an H100/H200, about what
the host needs to post it (a cuDNN call of 50-130 us of CPU, an NCCL send/receive pair, a fold
launch every four steps). The device then waits on the host between kernels: on an H200 a
simulated ring of 8 at 4K tokens, causal, D = 64 reached 0.42 of one fused call's speed in the
forward eagerly and 0.82 replayed from a graph (`benchmarks/diagnostics/ring_graph_capture.py`),
and on 4 H200s over NCCL the same ring's forward+backward went from 0.51-0.59 to 0.92. Where the
device is the bottleneck (longer chunks, larger heads) a replay gains nothing and its
copies cost a few percent, so graphs are off by default: `set_cuda_graphs(True)`, or
`SeqParStrategy(cuda_graphs=True)`.

How: the first call of a signature (shapes, strides, dtypes, the op's settings and its process
group) runs eagerly, which makes NCCL connect the peers that signature uses and builds cuDNN's
plans and Triton's kernels; the second captures the pass on copies of its inputs (K and V
side by side, so the pass needn't stack them) and replays it; later calls copy their inputs
into the graph's, replay, and copy the outputs out. Every rank
of a group makes the same calls in the same order, so their graphs capture and replay together,
and a graph's NCCL operations meet their peers' as the eager ones would. Calls that can't be
captured run eagerly: off CUDA, a backend other than NCCL on a group of several ranks, or inside
another capture. A call with a key padding mask replays too: the group's masks (gathered
eagerly before the pass, as every call gathers them) are one more input copied into the graph.

Each signature keeps its graph's memory (the pass's temporaries, its input copies and outputs)
until `clear_cuda_graphs()`; every layer of a model shares one graph per pass.

A process group must outlive the graphs that talk on it: destroying an NCCL group while a
graph still holds its work never returns. So once a graph on a group is captured,
`torch.distributed.destroy_process_group` drops that group's graphs before it destroys the group
(`_graphs_go_before_their_group`). A reference to that function taken before the first capture
(`from torch.distributed import destroy_process_group`) bypasses this: call
`clear_cuda_graphs()` before it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from lightning_seqpar.ops._kernels import block_kernel_override

_ENABLED = False
# Backends whose operations a CUDA graph can capture. The benchmarks' simulated ring adds its
# fake group's, whose transfers are then NCCL's.
CAPTURABLE_BACKENDS = {dist.Backend.NCCL}


def set_cuda_graphs(enabled: bool) -> None:
    """Replay the ring's forward and backward from CUDA graphs where they can be (see the
    module's docstring); False (the default) runs every call eagerly."""
    global _ENABLED
    _ENABLED = bool(enabled)


def cuda_graphs_enabled() -> bool:
    return _ENABLED


class _Captured:
    """One pass captured on `inputs`, copies of the first inputs it saw: replaying computes it
    on whatever was copied into them and writes `outputs`."""

    def __init__(self, fn: Callable, tensors: list[torch.Tensor], group) -> None:
        # Ordinary tensors even when the capture runs under inference mode (Lightning's sanity
        # check and validation): later replays copy into them, and an in-place write to an
        # inference tensor outside inference mode is an error.
        with torch.inference_mode(False):
            self.inputs = input_copies(tensors)
        self.group = group  # held, so that its id is not reused by a later group while cached
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (NCCL's watchdog, the data loader's pinning) keep calling
        # into CUDA while this one captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for buffer, tensor in zip(self.inputs, tensors):
            buffer.copy_(tensor)
        self.graph.replay()
        # The next replay overwrites the outputs: the caller gets its own.
        return tuple(out.clone() for out in self.outputs)


def input_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of a pass's inputs for its graph to read. Consecutive contiguous inputs of one shape,
    dtype and device share one buffer, one after another, so that the ring's K and V are stacked
    already and its pass views them as the block it sends (`_common.stack_kv`) instead of
    stacking them on every replay: at 4K tokens per rank that copy was 0.03 ms of a 2 ms replayed
    forward on an H200. Other inputs are cloned as they are laid out, and so are tensors whose
    size in bytes is not a multiple of 16: each copy must start where the fused kernels' loads
    want it, as a fresh allocation does."""
    copies: list[torch.Tensor] = []
    for key, run in itertools.groupby(tensors, key=_buffer_key):
        run = list(run)
        copies.extend(torch.stack(run).unbind(0) if key is not None and len(run) > 1 else (t.clone() for t in run))
    return copies


def _buffer_key(t: torch.Tensor):
    """Inputs with equal keys, one after another, share a buffer; None shares with nothing."""
    if t.is_contiguous() and t.numel() * t.element_size() % 16 == 0:
        return t.shape, t.dtype, t.device
    return None


class _Seen:
    """A signature called once, eagerly: the next call captures it."""

    def __init__(self, group) -> None:
        self.group = group  # held for the same reason as a capture's


_CACHE: dict[tuple, _Seen | _Captured] = {}


def clear_cuda_graphs() -> None:
    """Drop every captured graph and its memory (a new process group, or graphs no longer
    wanted): the next calls run eagerly and capture again."""
    _CACHE.clear()


def _drop_graphs_of(group) -> int:
    """Drop the graphs (and the first calls seen) that talk on `group`, or on any group where
    `group` is None or the world's, whose destruction takes every group with it; returns how
    many went."""
    every = group is None or group is dist.group.WORLD
    gone = [key for key, entry in _CACHE.items() if every or entry.group is group]
    for key in gone:
        del _CACHE[key]
    return len(gone)


def _graphs_go_before_their_group() -> None:
    """Make `torch.distributed.destroy_process_group` drop the graphs of the groups it destroys
    before it destroys them. With a replayed ring's graphs still held, `destroy_process_group()`
    did not return on 2 x H200 (2026-11-26, two ranks over NCCL, killed after 60 s); with the
    graphs dropped first it returned at once. Lightning calls it at exit for NCCL runs, and
    scripts call it last, after a training loop that need not have cleared anything. Installed
    once; later calls find it in place."""
    original = dist.destroy_process_group
    if getattr(original, "drops_ring_graphs", False):
        return

    @functools.wraps(original)
    def destroy_process_group(group=None, *args, **kwargs):
        if _drop_graphs_of(group) and torch.cuda.is_available() and torch.cuda.is_initialized():
            # A replay of a dropped graph may still be running on the group's communicator.
            torch.cuda.synchronize()
        return original(group, *args, **kwargs)

    destroy_process_group.drops_ring_graphs = True
    dist.destroy_process_group = c10d.destroy_process_group = destroy_process_group


def captured_signatures() -> int:
    """How many signatures hold a captured graph."""
    return sum(isinstance(entry, _Captured) for entry in _CACHE.values())


def graphs_apply(x: torch.Tensor, group) -> bool:
    """Whether the ring's passes on inputs like `x` over `group` run from CUDA graphs: the same
    answer on every rank of the group, so `auto_attention` may choose by it."""
    if not (_ENABLED and x.is_cuda):
        return False
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return False
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return True
    return dist.get_backend(group) in CAPTURABLE_BACKENDS


def _capturable(tensors: list[torch.Tensor], ring) -> bool:
    return graphs_apply(tensors[0], ring.group)


def _group(ring):
    """The process group a ring's graph talks on (None for a ring of one rank, which doesn't)."""
    return None if ring.size == 1 else ring.process_group


def _pass(fn: Callable, ring, options: dict, masked: bool, *inputs: torch.Tensor):
    """`fn` on a graph's inputs: the pass's tensors, and last the masks if `masked`."""
    tensors, masks = (inputs[:-1], inputs[-1]) if masked else (inputs, None)
    return fn(*tensors, ring, masks, **options)


def graphed(fn: Callable) -> Callable:
    """`fn(*tensors, ring, masks, **options)` (a pass of an op: tensors in, a tuple of tensors
    out), replayed from a CUDA graph per signature where it can be."""

    @functools.wraps(fn)
    def run(*args, **options):
        *tensors, ring, masks = args
        if not _capturable(tensors, ring):
            return fn(*args, **options)
        group = _group(ring)
        inputs = tensors if masks is None else [*tensors, masks]
        # Everything the pass's work depends on: its inputs' layout (the masks' too, and whether
        # there are any), its group and place in it, its options, and the one global setting
        # that changes its kernels.
        key = (fn.__qualname__, tensors[0].device, masks is not None, tuple((t.shape, t.stride(), t.dtype) for t in inputs),
               id(group), ring.rank, ring.size, tuple(sorted(options.items())), block_kernel_override())
        entry = _CACHE.get(key)
        if entry is None:
            _CACHE[key] = _Seen(group)
            return fn(*args, **options)
        if isinstance(entry, _Seen):
            try:
                entry = _Captured(functools.partial(_pass, fn, ring, options, masks is not None), inputs, group)
            except Exception as error:
                raise RuntimeError(
                    f"capturing {fn.__qualname__} in a CUDA graph failed ({error}); run it eagerly with "
                    f"lightning_seqpar.ops.set_cuda_graphs(False) or SeqParStrategy(cuda_graphs=False)"
                ) from error
            _CACHE[key] = entry
            if group is not None:
                _graphs_go_before_their_group()
        return entry(inputs)

    return run

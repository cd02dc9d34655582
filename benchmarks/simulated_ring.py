"""One rank of an N-rank ring, simulated in a single process, with an exact reference.

torch's fake process group gives `Ring` the rank and size of a real group; the simulation then
makes every rank's chunk of K/V (and key padding mask) equal to this rank's, by turning each
ring exchange into a copy. The compute of that rank is exactly what it would do in a real ring,
so it can be timed and its peak memory measured on one device, and its result checked against
SDPA on the global sequence that such a ring would hold.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seqpar.layout import shard_sequence, unshard_sequence
from lightning_seqpar.ops import ATTENTION_OPS, set_input_checks
from lightning_seqpar.ops import _comm, _common, _graphs

# The package exports the op under its module's name, which hides the module: fetch it by path.
allgather_module = importlib.import_module("lightning_seqpar.ops.allgather_attention")


@contextlib.contextmanager
def fake_group(rank: int, world_size: int):
    """The default process group as a fake one: ranks and sizes, no communication."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    set_input_checks(False)  # the fake all-gather returns no real records
    try:
        yield
    finally:
        set_input_checks(True)
        dist.destroy_process_group()


class _StreamWork:
    """The pending work of a simulated transfer (`Ring.exchange`, `Ring.fetch`): waiting makes the
    compute stream wait for the copy, as waiting on an NCCL request does."""

    def __init__(self, event):
        self.event = event

    def wait(self):
        torch.cuda.current_stream().wait_event(self.event)


_COPY_STREAMS: dict = {}

# How a simulated transfer copies on CUDA:
# - "memcpy": cudaMemcpyAsync on a side stream (the copy engine);
# - "kernel": a copy kernel of `COPY_PROGRAMS` programs on a side stream;
# - "nccl": a real NCCL send and receive of this process to itself (a one-rank NCCL group),
#   posted as one coalesced pair as `Ring._post` posts it: NCCL's own kernels on NCCL's own
#   stream, and its host-side posting cost (31 us per exchange on an H200 host, against 52 us
#   through `batch_isend_irecv`, which the ring used until 2026-11-26).
# - "peer": each transfer goes to a second GPU and back by peer copies, in chunks on
#   two side streams so that the two hops overlap: copy engines over NVLink, no SMs, and this
#   GPU's memory read once and written once per transfer, as a real rank's is at a step where it
#   sends a block and receives one. What a transport on copy engines (peer-mapped or symmetric
#   memory) would give a ring inside one node; the ops have no such transport. Needs two GPUs
#   and CuPy, which issues the copies on this GPU's streams, so that a capture takes them in.
# Measured on an H200 at 8K tokens per rank (benchmarks/results/simulated_transfer_cuda.txt),
# and for "peer" on two:
# - memcpy: one ~125 us stall of the compute stream per backward step, ending when the dK/dV
#   copy ends, with a cuDNN memset just before the stalled kernel: likely the memset waiting
#   behind the copy on the copy engine, which NCCL's kernels would not cause. 2.2 ms of 56 ms
#   idle in all.
# - kernel: 16 programs copy at ~350 GB/s (the memcpy at ~1.7 TB/s), and their blocks
#   seem to get SMs only between the attention kernels' waves: ring efficiency falls by 0.07-0.32;
#   19 ms idle.
# - peer (2 x H200, 2026-11-26, results/peer_transfer_h200x2.txt): a block crosses at ~0.3 TB/s
#   each way, about four times slower than NCCL's copy to itself; the forward's attention calls
#   no longer slow down beside the transfers (forward 3-5% faster at 4K), but the backward's
#   first and last visits wait on the link (forward+backward 2-7% slower).
# NCCL is the default: it is what the ring runs on, and it removes the memcpy's stalls
# (1.6 ms idle of 30.7 ms -> 0.6 ms at 8K causal, D = 128) at the price of NCCL's kernels
# taking SMs, so the ring's timings moved by no more than noise.
TRANSFERS = ("memcpy", "kernel", "nccl", "peer")
DEFAULT_TRANSFER = "nccl"
_transfer = DEFAULT_TRANSFER
# Programs of the copy kernel: NCCL sends to one peer over a few channels, a CTA each.
COPY_PROGRAMS = 16


# The priority of NCCL's stream in the "nccl" mode. High lets a transfer's kernel take SMs as
# soon as an attention kernel's blocks retire, where at normal priority it waits for the
# kernel's tail. In a trace it removed the compute stream's waits (0.18-0.22 ms of a 2.05 ms
# forward) but slowed the attention kernels by 0.09 ms, and timed efficiency moved within noise,
# so the ops leave NCCL's default (results/transfer_schedule_trial.txt).
COMM_PRIORITIES = ("normal", "high")
_comm_priority = "normal"


def set_transfer(mode: str, comm_priority: str = "normal") -> None:
    """How simulated transfers copy on CUDA (`TRANSFERS`), and at which priority NCCL's stream
    runs them (`COMM_PRIORITIES`)."""
    global _transfer, _comm_priority
    if mode not in TRANSFERS:
        raise ValueError(f"unknown transfer {mode!r}: use one of {TRANSFERS}")
    if comm_priority not in COMM_PRIORITIES:
        raise ValueError(f"unknown comm priority {comm_priority!r}: use one of {COMM_PRIORITIES}")
    _transfer, _comm_priority = mode, comm_priority


@functools.cache
def _kernel_copy():
    """A copy kernel of `COPY_PROGRAMS` programs, each looping over its share; None without
    Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        step = tl.num_programs(0) * BLOCK
        for start in range(tl.program_id(0) * BLOCK, n, step):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < n
            tl.store(dst + offsets, tl.load(src + offsets, mask=inside), mask=inside)

    def copy(send: torch.Tensor, recv: torch.Tensor) -> None:
        words_in, words_out = send.view(-1).view(torch.int32), recv.view(-1).view(torch.int32)
        copy_kernel[(COPY_PROGRAMS,)](words_in, words_out, words_in.numel(), BLOCK=4096, num_warps=8)

    return copy


# The "peer" mode's chunk: small enough that the hop back starts soon after the hop out, large
# enough that a copy engine runs at full rate.
PEER_CHUNK_BYTES = 8 << 20


class _PeerCopies:
    """Copies by way of the next GPU: `send` out to a staging buffer there and back into `recv`,
    chunk by chunk, the hop out on one stream and the hop back on another."""

    def __init__(self, device: torch.device):
        import cupy

        if torch.cuda.device_count() < 2:
            raise RuntimeError('the "peer" transfer needs a second GPU')
        self.here, self.there = device.index, (device.index + 1) % torch.cuda.device_count()
        for a, b in ((self.here, self.there), (self.there, self.here)):
            if not torch.cuda.can_device_access_peer(a, b):
                raise RuntimeError(f"GPU {a} cannot reach GPU {b} as a peer")
            with cupy.cuda.Device(a):
                try:
                    cupy.cuda.runtime.deviceEnablePeerAccess(b)
                except cupy.cuda.runtime.CUDARuntimeError:
                    pass  # already enabled
        # cudaMemcpyAsync on unified addresses, not cudaMemcpyPeerAsync, which a capture refuses.
        default = cupy.cuda.runtime.memcpyDefault
        self.memcpy = lambda dst, src, size, stream: cupy.cuda.runtime.memcpyAsync(dst, src, size, default, stream)
        self.out, self.back = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.stage = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", self.there))

    def __call__(self, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> torch.cuda.Event:
        sizes = [send.numel() * send.element_size() for send in sends]
        needed = sum(sizes)
        if needed > self.stage.numel():
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the peer staging buffer would grow inside a capture: run the shape eagerly first")
            self.stage = torch.empty(needed, dtype=torch.uint8, device=self.stage.device)
        # Both hops start after the work queued so far, as NCCL's do; and the hop out may
        # overwrite the staging buffer only once the last transfer's hop back has read it.
        # (`back` joins the current stream first, so that inside a capture the event of this
        # wait is captured too.)
        current = torch.cuda.current_stream()
        self.out.wait_stream(current)
        self.back.wait_stream(current)
        self.out.wait_stream(self.back)
        stage = self.stage.data_ptr()
        for send, recv, size in zip(sends, recvs, sizes):
            for start in range(0, size, PEER_CHUNK_BYTES):
                chunk = min(PEER_CHUNK_BYTES, size - start)
                self.memcpy(stage + start, send.data_ptr() + start, chunk, self.out.cuda_stream)
                landed = torch.cuda.Event()
                landed.record(self.out)
                self.back.wait_event(landed)
                self.memcpy(recv.data_ptr() + start, stage + start, chunk, self.back.cuda_stream)
            stage += size
        for send, recv in zip(sends, recvs):
            send.record_stream(self.out)
            recv.record_stream(self.back)
        done = torch.cuda.Event()
        done.record(self.back)
        return done


_PEER_COPIES: dict = {}


def _copy(send: torch.Tensor, recv: torch.Tensor) -> None:
    if _transfer == "kernel" and (send.numel() * send.element_size()) % 4 == 0:
        copy = _kernel_copy()
        if copy is not None:
            copy(send, recv)
            return
    recv.copy_(send)


@functools.cache
def _nccl_to_self(device: torch.device, comm_priority: str):
    """NCCL's backend for a group of one rank on `device`: sends to itself and receives from
    itself, on a stream of `comm_priority`."""
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=comm_priority == "high")
    backend = dist.ProcessGroupNCCL(dist.HashStore(), 0, 1, options)
    # Shut down while the interpreter is whole: left to its destructor at exit, it warned on
    # every run that it was never destroyed.
    atexit.register(_shut_down, backend)
    return backend


def _shut_down(backend) -> None:
    # Graphs still captured hold this backend's NCCL work: drop them, and let the device finish,
    # before the backend goes. `trace.py --cuda-graphs`, which never dropped its graphs, did not
    # exit after writing its files.
    _graphs.clear_cuda_graphs()
    torch.cuda.synchronize()
    # Newer releases name it `shutdown`, older ones `_shutdown`.
    (getattr(backend, "shutdown", None) or backend._shutdown)()


def _nccl_transfer(sends: list[torch.Tensor], recvs: list[torch.Tensor]):
    """`sends` through NCCL to this process, into `recvs`: coalesced sends and receives, as one
    call of `Ring._post` in the ring posts them; waiting on the returned work makes the current
    stream wait for NCCL's stream."""
    nccl = _nccl_to_self(sends[0].device, _comm_priority)
    nccl._start_coalescing()
    for send, recv in zip(sends, recvs):
        nccl.send([send], 0, 0)
        nccl.recv([recv], 0, 0)
    return recvs, [nccl._end_coalescing()]


def _simulated_transfers(sends: list[torch.Tensor], recvs: list[torch.Tensor] | None = None):
    """The received tensors: copies of `sends` (contiguous, as a send takes them) into `recvs`
    (default: new tensors), and the pending work. On CUDA the copies run on a side stream, like
    NCCL's kernels (or are NCCL's, in the "nccl" mode), so they overlap the block compute
    exactly where a real transfer could."""
    sends = [send.contiguous() for send in sends]
    if recvs is None:
        recvs = [torch.empty_like(send) for send in sends]
    if not sends:
        return recvs, []
    if not sends[0].is_cuda:
        for send, recv in zip(sends, recvs):
            recv.copy_(send)
        return recvs, []
    if _transfer == "nccl":
        return _nccl_transfer(sends, recvs)
    if _transfer == "peer":
        device = sends[0].device
        if device not in _PEER_COPIES:
            _PEER_COPIES[device] = _PeerCopies(device)
        return recvs, [_StreamWork(_PEER_COPIES[device](sends, recvs))]
    stream = _COPY_STREAMS.setdefault(sends[0].device, torch.cuda.Stream(sends[0].device))
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for send, recv in zip(sends, recvs):
            _copy(send, recv)
        event = torch.cuda.Event()
        event.record(stream)
    for send, recv in zip(sends, recvs):
        send.record_stream(stream)
        recv.record_stream(torch.cuda.current_stream())
    return recvs, [_StreamWork(event)]


def _simulated_transfer(send: torch.Tensor):
    """One simulated transfer of `send`: what `Ring.exchange` returns."""
    recvs, pending = _simulated_transfers([send])
    return recvs[0], pending


@contextlib.contextmanager
def every_rank_holds_mine():
    """Every rank's K/V chunk equals this rank's: ring exchanges and fetches return what was sent
    (the visitor of this rank's block is this rank), and the all-gathers (of key padding masks,
    and of K/V in the all-gather op) return this rank's part once per rank. Partial gradients sent home come back to this rank as the parts it sent (with
    the rows they cover), and the all-gather op's reduce-scatter returns the sum of this rank's
    partials for every rank's chunk: with all chunks equal, both give the gradient of the one
    chunk they all are, summed over this rank's visits (see `check_rank`'s dk)."""

    def exchange(self, send, tag):
        return _simulated_transfer(send)

    def fetch(self, step, sends, recvs):
        return _simulated_transfers(sends, recvs)[1]

    def visitor(self, step):
        # The rank that visits this rank's block reads it as this rank reads the blocks it
        # visits, all of them being this rank's: so what the ring attention's backward sends
        # (the rows its visitor reads) is what it receives, row for row.
        return self.rank

    def send_home(self, step, parts, expected):
        if not parts:
            return [], []
        received, pending = _simulated_transfers([t for _, tensors in parts for t in tensors])
        received = iter(received)
        return [(rows, tuple(next(received) for _ in tensors)) for rows, tensors in parts], pending

    def gather(local, group):
        return local.unsqueeze(0).expand(dist.get_world_size(group), *local.shape).contiguous()

    def gather_kv(kv, ring):
        return gather(kv, ring.group)

    def reduce_scatter(partials, ring):
        return partials.sum(0)

    # (owner, attribute) -> its stand-in, patched in and restored from this one table.
    stand_ins = {
        (_comm.Ring, "exchange"): exchange, (_comm.Ring, "fetch"): fetch, (_comm.Ring, "send_home"): send_home,
        (_comm.Ring, "visitor"): visitor,
        (_common, "all_gather_rows"): gather, (allgather_module, "all_gather_kv"): gather_kv,
        (allgather_module, "reduce_scatter_grads"): reduce_scatter,
    }
    originals = {target: getattr(*target) for target in stand_ins}
    for (owner, name), stand_in in stand_ins.items():
        setattr(owner, name, stand_in)
    # Through NCCL or peer copies the simulated transfers are capturable, as the ring's are.
    capturable = _transfer in ("nccl", "peer")
    if capturable:
        _graphs.CAPTURABLE_BACKENDS.add("fake")
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
        if capturable:
            _graphs.CAPTURABLE_BACKENDS.discard("fake")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def dense_attention_mask(key_mask: torch.Tensor | None, seq_len: int, causal: bool, device) -> torch.Tensor:
    """`[B or 1, 1, L, L]` bool mask for SDPA on the whole sequence: real keys (`key_mask`
    `[B, L]`, True = real) and, if `causal`, the lower triangle."""
    batch = 1 if key_mask is None else key_mask.size(0)
    attn_mask = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool, device=device)
    if key_mask is not None:
        attn_mask &= key_mask[:, None, None, :]
    if causal:
        attn_mask &= torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return attn_mask


@contextlib.contextmanager
def simulated_rank(rank: int, world_size: int):
    """Rank `rank` of a ring of `world_size` in which every rank holds this rank's chunk."""
    with fake_group(rank, world_size), every_rank_holds_mine():
        yield


def check_rank(algo, rank, world_size, *, batch, hq, hkv, local_len, dim, causal, layout, dtype, device, masked=False, seed=0,
               reference_dtype=torch.float64, simulated=True):
    """Relative errors (out, dq, dk, dv) of one simulated rank against SDPA on the global
    sequence in which every rank's K/V chunk equals this rank's. The reference runs in
    `reference_dtype` (float32 on CUDA reaches long sequences through the O(L) kernels).
    `simulated=False`: the caller holds `simulated_rank(rank, world_size)` already (several
    calls in one process group, as CUDA graphs need)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(heads):
        return torch.randn(batch, heads, local_len, dim, generator=gen, device=device, dtype=dtype)

    q, k, v, dout = randn(hq), randn(hkv), randn(hkv), randn(hq)
    mask = None
    if masked:
        mask = torch.ones(batch, local_len, dtype=torch.bool, device=device)
        # Right padding whose length moves with the seed, so that replayed calls prove they
        # read the masks they were given.
        mask[0, local_len // 3 + seed % 4 :] = False
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    with simulated_rank(rank, world_size) if simulated else contextlib.nullcontext():
        out = ATTENTION_OPS[algo](*local, causal=causal, layout=layout, key_padding_mask=mask)
        out.backward(dout)

    def globalize(x, dim_, fill=None):
        """The global tensor whose chunk for every rank is `x` (or zeros but for this rank)."""
        chunks = [x if fill is None or r == rank else torch.zeros_like(x) for r in range(world_size)]
        return unshard_sequence(chunks, dim_, layout)

    rd = reference_dtype
    ref_inputs = [globalize(q.to(rd), 2, fill=0), globalize(k.to(rd), 2), globalize(v.to(rd), 2)]
    ref_inputs = [t.requires_grad_() for t in ref_inputs]
    seq_len = local_len * world_size
    attn_mask = dense_attention_mask(globalize(mask, 1), seq_len, causal, device) if masked else None
    ref_out = F.scaled_dot_product_attention(
        *ref_inputs, attn_mask=attn_mask, is_causal=causal and not masked, enable_gqa=True
    )
    ref_out.backward(globalize(dout.to(rd), 2, fill=0))

    def mine(x):
        return shard_sequence(x, 2, rank, world_size, layout)

    def summed_over_owners(x):
        return sum(shard_sequence(x, 2, r, world_size, layout) for r in range(world_size))

    return {
        "out": relative_error(out.detach(), mine(ref_out.detach())),
        "dq": relative_error(local[0].grad, mine(ref_inputs[0].grad)),
        "dk": relative_error(local[1].grad, summed_over_owners(ref_inputs[1].grad)),
        "dv": relative_error(local[2].grad, summed_over_owners(ref_inputs[2].grad)),
    }

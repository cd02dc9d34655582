"""`SeqParStrategy`: Lightning glue for sequence parallelism.

The hooks, in the order Lightning calls them, are the shape of this class:

- `__init__` / `set_world_ranks` (at `Trainer(...)`): validate the configuration, resolve
  `sp_size`, so a wrong one fails before any process starts;
- `setup_environment`: the world process group (DDP's), then the cached 2-D ("dp", "sp") mesh;
- `distributed_sampler_kwargs` / `process_dataloader`: samples split over dp only, dataloader
  workers seeded by dp rank, so every rank of one SP group reads and augments the same samples;
  the training loader made resumable in the middle of an epoch (`lightning_seqpar.sampler`);
- `save_checkpoint` / `load_checkpoint` / `on_train_start`: every rank's random state and the
  training data's position travel with checkpoints;
- `setup`: swap the attention *before* DDP wrapping, precision and optimizers see the model;
- `batch_to_device`: cut each sequence for this SP rank, record its global positions, move;
- `predict_step`: gather the local outputs back into whole sequences;
- `teardown`: undo the swap, so the model is single-device again outside the run.

Gradients: DDP averages over all W = dp × sp ranks. With `lightning_seqpar.cross_entropy` (or
`token_mean`) each rank backpropagates its chunk's loss sum times W / N, N the valid tokens of
the global batch, which makes the average the single-device token-mean gradient.
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.utils.data import DataLoader

from lightning_seqpar.data_utils import (
    POSITION_IDS_KEY,
    DataParallelShard,
    batch_digest,
    gather_sequence,
    map_tensors,
    pad_batch,
    shard_batch,
)
from lightning_seqpar.integrations import load_installed as load_installed_integrations
from lightning_seqpar.layout import LAYOUTS, required_multiple, sequence_positions, shard_sequence
from lightning_seqpar.ops import ATTENTION_OPS
from lightning_seqpar.ops._checks import check_groups_for_rows, register_check_group
from lightning_seqpar.ops._comm import collective_device
from lightning_seqpar.ops._graphs import CAPTURABLE_BACKENDS, clear_cuda_graphs, cuda_graphs_enabled, set_cuda_graphs
from lightning_seqpar.sampler import LOADER_STATE_MARK, make_resumable
from lightning_seqpar.swap import RingContext, SwapReport, restore_attention, swap_attention
from lightning_seqpar.swap import context as ring_contexts

__all__ = ["SeqParStrategy"]

# After an exception, how long the launching process lets the ranks it started end by themselves
# (a failed peer makes their next collective fail at once) before it kills them.
CHILD_EXIT_GRACE_S = 3.0
# Checkpoint key of every rank's random state (torch, numpy, Python; CUDA where present), a list
# indexed by global rank: dropout and main-process augmentation continue where they were.
RNG_STATES_KEY = "seqpar_rng_states"
# Checkpoint key of the training loader's position (`lightning_seqpar.sampler`). Lightning keeps
# loader states with the fit loop's state and, on a mid-epoch restart, refuses a checkpoint whose
# loader states have no stateful loader to go to: a run without this strategy (plain DataLoader)
# could not resume it. So the strategy keeps them under its own key and hands them back to
# Lightning on load.
LOADER_STATES_KEY = "seqpar_loader_states"
# The script launcher (rank 0 of a node) passes its pid, in this variable, to the ranks it starts,
# and only to them: read once and removed at import, so processes those ranks start don't see it.
LAUNCHER_PID_ENV = "LIGHTNING_SEQPAR_LAUNCHER_PID"
_LAUNCHER_PID = os.environ.pop(LAUNCHER_PID_ENV, None)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Words of the errors a rank sees when a collective breaks because another rank failed or hung.
_PEER_FAILURE_WORDS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Watchdog")

DEFAULT_LAYOUT = "zigzag"

# One mesh per process and world: process groups are expensive and every rank must create them
# together, so fit/validate/test/predict and later Trainers of the same world reuse them.
_MESHES: dict[tuple, Any] = {}


def _device_mesh(device_type: str, dp_size: int, sp_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    key = (device_type, dp_size, sp_size, id(dist.group.WORLD))
    mesh = _MESHES.get(key)
    if mesh is None:
        mesh = _MESHES[key] = init_device_mesh(device_type, (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return mesh


# This rank's CPU twin of its mesh's sequence-parallel group, cached like the meshes.
_CHECK_TWINS: dict[tuple, Any] = {}
CPU_CHECKS_ENV = "LIGHTNING_SEQPAR_CPU_CHECKS"


def checks_on_a_cpu_twin(sp_size: int, backend: str) -> bool:
    """Whether the strategy gives its sp group a gloo twin for the attention ops' input checks:
    only where there is a group to check (sp_size > 1), its own collectives run on a device
    backend (NCCL), gloo exists, and LIGHTNING_SEQPAR_CPU_CHECKS isn't "0" (set it where gloo
    can't connect the ranks: the check then runs on the sp group itself)."""
    if sp_size == 1 or backend == dist.Backend.GLOO:
        return False
    return os.environ.get(CPU_CHECKS_ENV, "1") != "0" and dist.is_gloo_available()


def _seed_worker(worker_id: int, dp_rank: int, user_init_fn=None) -> None:
    """Seed torch, random and numpy of a dataloader worker from the loader's base seed (agreed
    within the SP group), the worker id and the *dp* rank, then run the user's init function."""
    pl_worker_init_function(worker_id, rank=dp_rank)
    if user_init_fn is not None:
        user_init_fn(worker_id)


class _ScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, telling the ranks it starts its own pid (`LAUNCHER_PID_ENV`)."""

    def _call_children_scripts(self) -> None:
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        try:
            super()._call_children_scripts()
        finally:
            os.environ.pop(LAUNCHER_PID_ENV, None)


def _die_with_launcher(armed: bool) -> None:
    """In a rank started by the script launcher (Linux): while `armed`, the kernel SIGKILLs this
    process the moment its launcher (rank 0) dies, SIGKILL included.

    Why this and not the collective timeout: a dead rank 0 breaks the other ranks' collectives
    (at once, "Connection reset by peer"; or after `timeout=`), but only of ranks that reach one.
    A rank busy elsewhere (a long step, a stalled dataloader, a hang in user code) has no
    collective to fail and would outlive the job as an orphan, holding its device; no Python-level
    watchdog can run in a process hung in C code either. PR_SET_PDEATHSIG is the kernel's own
    parent-death notice: nothing in the rank needs to run.

    Armed from `setup_environment` to `teardown` only: outside a Trainer run a rank may outlive
    rank 0 on purpose (work after `fit`). The signal follows the *thread* that started the rank
    (the one that called `fit` in the launcher), which is the main thread in a script."""
    if _LAUNCHER_PID is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL) if armed else 0, 0, 0, 0) != 0:
        warnings.warn(f"prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this rank "
                      f"won't end by itself if its launcher (rank 0) is killed while it is outside a collective")
        return
    launcher = int(_LAUNCHER_PID)
    if armed and os.getppid() != launcher:
        libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
        try:
            os.kill(launcher, 0)
        except ProcessLookupError:  # re-parented: it died before the notice was set
            raise RuntimeError(f"the process that launched this rank (rank 0, pid {launcher}) has exited") from None
        # else not a rank it started (the variable leaked into a process that a rank started)


def _rng_states(device: torch.device) -> dict[str, Any]:
    """This process's random states as tensors and plain values (loadable with weights_only)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


class SeqParStrategy(DDPStrategy):
    """Sequence parallelism: each sequence is cut across the `sp_size` ranks of a group,
    attention runs over the whole sequence through a ring, and groups are data-parallel.

    Args:
        sp_size: ranks per sequence-parallel group; "auto" = the devices of one node (a ring
            stays inside a node). Must divide the world size.
        attention: "ring" (ring attention with online softmax, O(L/sp) memory), "allgather"
            (one all-gather of K/V, then a few fused calls: faster for short chunks, K/V of
            the whole sequence held for the length of each call), "auto" (allgather below
            `lightning_seqpar.ops.set_allgather_below` tokens per rank, 2048 by default, else
            ring; with `cuda_graphs`, the ring wherever the graphs apply) or "rsa" (the paper's
            Ring Self-Attention, quadratic memory: the reference).
        layout: how sequences are cut: "zigzag" (balanced for causal attention; sequence length
            a multiple of 2 × sp_size), "contiguous" (a multiple of sp_size), "auto" = zigzag.
        seq_keys: mapping keys / dataclass fields whose tensors are sequences to cut; None =
            every tensor whose size along `seq_dim` equals the batch's sequence length.
        seq_dim: the sequence dim of batch tensors (1 for `[B, L, ...]`).
        inject_position_ids: add `"position_ids"` (`[B, L_local]` global positions) to mapping
            batches that don't have one. Always available as `strategy.position_ids`.
        pad_to_multiple: right-pad a batch whose sequence length the layout can't split to the
            next multiple (2 × sp_size for zigzag, sp_size for contiguous): tensors under a key of
            `pad_values` get that value (labels: -100, ignored by the loss), `position_ids`
            continue counting, others get 0 (an `attention_mask` gets False), and the padded keys
            are masked in every ring attention. Training equals the unpadded run. False = such a
            batch raises on every rank, naming the multiple.
        pad_values: with `pad_to_multiple`, the padding value per key; default `{"labels": -100}`.
        check_batch_consistency: for the first N batches, hash each whole batch (before the
            cut) and compare the hashes inside every SP group; a mismatch (a hand-made sampler,
            augmentation seeded by global rank) raises on every rank. 0 = off.
        cuda_graphs: replay the ring's forward and backward from CUDA graphs, one per pass and
            shape, shared by every layer (CUDA and NCCL only; "ring" and "auto" attention).
            Worth it where the host can't post ring steps as fast as the GPU runs them: short
            chunks (a few thousand tokens per rank) and small heads; costs a copy of each pass's
            inputs and outputs and the graphs' memory. Calls with a key padding mask replay too.
            The attention alone gains most (4 H200s, 4K tokens per GPU, causal: 0.51-0.59 -> 0.92
            of one GPU's speed); a ~1B model's training step there gained nothing measurable, its
            other layers giving the host time to catch up (benchmarks/BENCHMARKS.md).
        **kwargs: passed to `DDPStrategy` (`timeout`, `process_group_backend`, `start_method`,
            DDP arguments, ...). `timeout` (a timedelta) bounds every collective, the ring's
            included: a rank that waits longer for a failed or hung peer raises.
    """

    strategy_name = "seqpar"

    def __init__(
        self,
        sp_size: int | str = "auto",
        attention: str = "ring",
        layout: str = "auto",
        seq_keys: str | Iterable[str] | None = None,
        seq_dim: int = 1,
        inject_position_ids: bool = True,
        pad_to_multiple: bool = False,
        pad_values: Mapping[str, int | float | bool] | None = None,
        check_batch_consistency: int = 0,
        cuda_graphs: bool = False,
        **kwargs: Any,
    ) -> None:
        if not (sp_size == "auto" or (isinstance(sp_size, int) and not isinstance(sp_size, bool) and sp_size >= 1)):
            raise ValueError(f"sp_size must be a positive int or 'auto' (the devices of one node), got {sp_size!r}")
        if attention not in ATTENTION_OPS:
            raise ValueError(
                f"unknown attention {attention!r}: use attention='ring' (ring attention, O(L/sp) memory), "
                f"'allgather' (all-gathered K/V, for short chunks), 'auto' (allgather for short chunks, "
                f"else ring) or 'rsa' (Ring Self-Attention)"
            )
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: use 'auto', {', '.join(map(repr, LAYOUTS))}")
        if not isinstance(seq_dim, int) or isinstance(seq_dim, bool) or seq_dim < 0:
            raise ValueError(f"seq_dim must be a non-negative int (the sequence dim of batch tensors), got {seq_dim!r}")
        if not isinstance(check_batch_consistency, int) or isinstance(check_batch_consistency, bool) or check_batch_consistency < 0:
            raise ValueError(
                f"check_batch_consistency is the number of first batches to check (0 = off), got {check_batch_consistency!r}"
            )
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs and attention not in ("ring", "auto"):
            raise ValueError(
                f"cuda_graphs=True replays ring attention; attention={attention!r} always runs eagerly: "
                f"use attention='ring' or 'auto', or cuda_graphs=False"
            )
        if pad_values is not None and not pad_to_multiple:
            raise ValueError("pad_values only applies with pad_to_multiple=True")
        if isinstance(seq_keys, str):
            seq_keys = (seq_keys,)
        super().__init__(**kwargs)
        self._sp_size_flag = sp_size
        self._sp_size: int | None = None
        self.attention = attention
        self.layout = DEFAULT_LAYOUT if layout == "auto" else layout
        self.seq_keys = None if seq_keys is None else tuple(seq_keys)
        self.seq_dim = seq_dim
        self.inject_position_ids = inject_position_ids
        self.pad_to_multiple = pad_to_multiple
        self.pad_values = dict(pad_values) if pad_values is not None else {"labels": -100}
        self.check_batch_consistency = check_batch_consistency
        self.cuda_graphs = cuda_graphs
        self._cuda_graphs_were: bool | None = None
        self._batches_seen = 0
        self._unpadded_length: int | None = None
        self._mesh = None
        self._swap: SwapReport | None = None
        self._fastpath_was: bool | None = None
        self._position_ids: torch.Tensor | None = None
        self._sequence_length: int | None = None
        self._loaded_rng_state: dict[str, Any] | None = None  # this rank's, from the checkpoint
        self._rng_again_at_train_start = False
        self._worker_seeds_drawn = 0
        self.summary: str | None = None

    # ----- configuration -------------------------------------------------------------------

    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        if self.parallel_devices is not None:
            self._sp_size = self._resolve_sp_size()

    def _resolve_sp_size(self) -> int:
        world = self.num_nodes * self.num_processes
        where = f"{world} processes = {self.num_nodes} node(s) × {self.num_processes} device(s)"
        sp = self.num_processes if self._sp_size_flag == "auto" else self._sp_size_flag
        if sp > world:
            raise ValueError(
                f"sp_size={sp} is larger than the world ({where}): set sp_size to at most {world}, "
                f"or give the Trainer more devices/num_nodes"
            )
        if world % sp:
            divisors = [d for d in range(1, world + 1) if world % d == 0]
            raise ValueError(
                f"the world ({where}) can't be split into sequence-parallel groups of sp_size={sp}: "
                f"choose an sp_size that divides {world} ({', '.join(map(str, divisors))}), or change "
                f"devices/num_nodes to a multiple of {sp}"
            )
        return sp

    def _resolved(self) -> int:
        if self._sp_size is None:
            raise RuntimeError("SeqParStrategy is not connected to a Trainer yet: sp_size is unknown")
        return self._sp_size

    # ----- groups ----------------------------------------------------------------------------

    @property
    def sp_size(self) -> int:
        return self._resolved()

    @property
    def dp_size(self) -> int:
        return self.world_size // self._resolved()

    @property
    def sp_rank(self) -> int:
        """Rank inside the sequence-parallel group (which chunk of each sequence it holds)."""
        return self.global_rank % self._resolved()

    @property
    def dp_rank(self) -> int:
        """Which SP group (and so which samples) this rank belongs to."""
        return self.global_rank // self._resolved()

    @property
    def mesh(self):
        """The 2-D `DeviceMesh` ("dp", "sp"); rank r sits at (r // sp_size, r % sp_size)."""
        if self._mesh is None:
            raise RuntimeError("the device mesh is built in setup_environment: it doesn't exist yet")
        return self._mesh

    @property
    def sp_group(self):
        return self.mesh.get_group("sp")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def position_ids(self) -> torch.Tensor | None:
        """Global positions (int64 `[L_local]`, on the device) of the tokens this rank holds in
        the current batch; what RoPE and position embeddings must see (zigzag reorders tokens)."""
        return self._position_ids

    @property
    def sequence_length(self) -> int | None:
        """The global sequence length of the current batch."""
        return self._sequence_length

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = _ScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_environment(self) -> None:
        _die_with_launcher(True)
        super().setup_environment()
        self._mesh = _device_mesh(self.root_device.type, self.dp_size, self.sp_size)
        self._apply_timeout_to_mesh_groups()
        self._register_check_group()

    def _register_check_group(self) -> None:
        # Attention checks its inputs on every rank at every call; read back from an NCCL
        # all-gather, that stalls the host until the GPU catches up, once per layer. A gloo twin
        # of the sp group does the same check on the CPU.
        sp_group = self.sp_group
        if not checks_on_a_cpu_twin(self.sp_size, dist.get_backend(sp_group)):
            return
        key = (self.dp_size, self.sp_size, id(dist.group.WORLD))
        if key not in _CHECK_TWINS:
            _CHECK_TWINS[key] = check_groups_for_rows(self._mesh, self._timeout)
        register_check_group(sp_group, _CHECK_TWINS[key])

    def _apply_timeout_to_mesh_groups(self) -> None:
        # new_group() gives the mesh's sub-groups the backend's default timeout (30 min on gloo,
        # 10 on NCCL), not the world's: without this, `timeout=` would not bound ring attention.
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if self._timeout is None or set_timeout is None:
            return
        for name in ("dp", "sp"):
            set_timeout(self._timeout, self._mesh.get_group(name))

    # ----- data ------------------------------------------------------------------------------

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        if not isinstance(dataloader, DataLoader):
            return dataloader
        if dataloader.num_workers > 0:
            self._seed_workers_by_dp_rank(dataloader)
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None and trainer.training:  # fit's training loader
            self._prepare_training_loader(dataloader, trainer)
        return dataloader

    def _prepare_training_loader(self, dataloader: DataLoader, trainer) -> None:
        # Lightning creates the resumed epoch's iterator before it sets the sampler's epoch, and
        # dataloader workers start reading at once: with num_workers > 0 a resumed run would read
        # its first epoch in epoch 0's order. The epoch Lightning is about to run, set now:
        _set_sampler_epoch(dataloader, trainer.fit_loop.epoch_progress.current.processed)
        resumable = make_resumable(dataloader, self._training_progress, self._training_loader_loaded)
        if resumable and dataloader.num_workers > 0 and self._loaded_rng_state is not None:
            rank_zero_warn(
                "resuming with dataloader workers (num_workers > 0): the data order and position and "
                "the main process's random state are restored, but random draws inside the workers "
                "(random augmentation in the dataset) start anew and differ from the uninterrupted run"
            )

    def _training_progress(self) -> tuple[int, bool]:
        """(batches of the current epoch handed to training_step, whether the epoch is done): the
        count Lightning itself restarts from, so the data resumes where the loop does."""
        trainer = self.lightning_module.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress
        ready = progress.current.ready
        return ready, bool(progress.is_last_batch) or ready >= trainer.num_training_batches

    def _training_loader_loaded(self, resumed: bool, problem: str | None) -> None:
        if problem:
            rank_zero_warn(f"mid-epoch checkpoint: {problem}; this epoch's data restarts from its beginning")
        # The uninterrupted run had created this epoch's iterator before the checkpoint; creating
        # it again here, after `load_checkpoint` restored the random state, draws the DataLoader's
        # base seed from the global torch generator: `on_train_start` restores the state again.
        self._rng_again_at_train_start = resumed

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._rng_again_at_train_start and self._loaded_rng_state is not None:
            _set_rng_states(self._loaded_rng_state, self.root_device)
        self._rng_again_at_train_start = False
        self._loaded_rng_state = None

    def _seed_workers_by_dp_rank(self, dataloader: DataLoader) -> None:
        # Workers draw their base seed from the loader's generator: one seed agreed inside the SP
        # group makes its ranks' workers draw the same random augmentations; the dp rank, mixed
        # in per worker, keeps different groups apart.
        if dataloader.generator is None:
            # Drawn without advancing the global generator (a resumed run, whose random state was
            # just restored, would otherwise continue from another state than the uninterrupted
            # one); the n-th loader of the process takes the n-th draw, so loaders differ.
            self._worker_seeds_drawn += 1
            with torch.random.fork_rng(devices=[]):
                seed = torch.randint(0, 2**62, (self._worker_seeds_drawn,), dtype=torch.int64)[-1]
            if self.sp_size > 1:
                seed = seed.to(collective_device(self.sp_group))
                dist.broadcast(seed, src=dist.get_global_rank(self.sp_group, 0), group=self.sp_group)
            dataloader.generator = torch.Generator().manual_seed(int(seed.item()))
        user_init_fn = dataloader.worker_init_fn
        if isinstance(user_init_fn, functools.partial) and user_init_fn.func is _seed_worker:
            return
        dataloader.worker_init_fn = functools.partial(_seed_worker, dp_rank=self.dp_rank, user_init_fn=user_init_fn)

    def shard_iterable(self, iterable: Iterable) -> DataParallelShard:
        """The part of an iterable dataset that this rank's SP group reads (item i to dp rank
        i mod dp_size); call it in `*_dataloader()` hooks."""
        return DataParallelShard(iterable, self.dp_rank, self.dp_size)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        device = device or self.root_device
        if self._batches_seen < self.check_batch_consistency:
            self._raise_on_every_rank(self._batch_mismatch(batch))
        self._batches_seen += 1
        problem, seq_len, unpadded_len = None, None, None
        try:
            if self.pad_to_multiple:
                batch, unpadded_len, _ = pad_batch(
                    batch, required_multiple(self.sp_size, self.layout), pad_values=self.pad_values,
                    seq_dim=self.seq_dim, seq_keys=self.seq_keys,
                )
            local, seq_len = shard_batch(
                batch, rank=self.sp_rank, world_size=self.sp_size, layout=self.layout,
                seq_dim=self.seq_dim, seq_keys=self.seq_keys,
            )
        except ValueError as err:
            problem = str(err)
        self._raise_on_every_rank(problem)
        self._sequence_length = seq_len
        self._unpadded_length = unpadded_len if unpadded_len != seq_len else None
        positions = sequence_positions(seq_len, self.sp_rank, self.sp_size, self.layout)
        self._position_ids = positions.to(device)
        if self._unpadded_length is not None:
            real = torch.arange(seq_len) < self._unpadded_length
            ring_contexts.set_sequence_padding(shard_sequence(real, 0, self.sp_rank, self.sp_size, self.layout).to(device))
        else:
            ring_contexts.set_sequence_padding(None)
        if self.inject_position_ids and isinstance(local, MutableMapping) and POSITION_IDS_KEY not in local:
            local[POSITION_IDS_KEY] = self._batched_positions(local, positions)
        return super().batch_to_device(local, device, dataloader_idx)

    def _batch_mismatch(self, batch: Any) -> str | None:
        """Compare a hash of the whole batch inside this rank's SP group; a message if they differ."""
        if self.sp_size == 1 or not dist.is_initialized():
            return None
        device = collective_device(self.sp_group)
        mine = torch.tensor([batch_digest(batch)], dtype=torch.int64, device=device)
        digests = [torch.empty_like(mine) for _ in range(self.sp_size)]
        dist.all_gather(digests, mine, group=self.sp_group)
        digests = [int(d.item()) for d in digests]
        if len(set(digests)) == 1:
            return None
        members = [dist.get_global_rank(self.sp_group, i) for i in range(self.sp_size)]
        groups: dict[int, list[int]] = {}
        for rank, d in zip(members, digests):
            groups.setdefault(d, []).append(rank)
        return (
            f"the ranks {members} of one sequence-parallel group received different batches at batch "
            f"{self._batches_seen} (ranks with equal batches: {list(groups.values())}); every rank of an "
            f"SP group must hold the same samples with the same augmentation, or the cut sequences are "
            f"pieces of different ones. Likely causes: a sampler built by hand with the global rank / "
            f"world size (use trainer.strategy.distributed_sampler_kwargs: dp rank and dp size, or let "
            f"Lightning add the sampler), an iterable dataset sharded by global rank (use "
            f"DataParallelShard / strategy.shard_iterable), or random augmentation seeded by global rank "
            f"or unseeded in the main process (call lightning.seed_everything(...), and seed by dp rank)"
        )

    def _batched_positions(self, local_batch: Any, positions: torch.Tensor) -> torch.Tensor:
        local_len = positions.numel()
        shapes: list[torch.Size] = []
        map_tensors(local_batch, lambda t, key: shapes.append(t.shape) or t)
        lead = next((s[: self.seq_dim] for s in shapes if len(s) > self.seq_dim and s[self.seq_dim] == local_len), None)
        lead = tuple(lead or ())
        view = positions.view(*([1] * len(lead)), local_len)
        return view.expand(*lead, local_len)

    def _raise_on_every_rank(self, problem: str | None) -> None:
        """Raise `problem` on every rank of the world when any rank has one: a rank that raised
        alone would leave the others waiting in the next collective until the timeout."""
        if self.world_size == 1 or not dist.is_initialized():
            if problem:
                raise ValueError(problem)
            return
        flag = torch.tensor([int(problem is not None)], device=collective_device(None))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        problems: list[str | None] = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        first = next(p for p in problems if p)
        ranks = [r for r, p in enumerate(problems) if p]
        raise ValueError(f"sequence-parallel batch on rank(s) {ranks}: {first}")

    # ----- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        # Called on every rank (Trainer.save_checkpoint); rank 0 writes what all ranks gathered.
        mine = _rng_states(self.root_device)
        states: list[Any] = [mine]
        if self.world_size > 1 and dist.is_initialized():
            states = [None] * self.world_size
            dist.all_gather_object(states, mine)
        checkpoint[RNG_STATES_KEY] = states
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        loader_states = fit_state.get("combined_loader")
        if loader_states and all(isinstance(s, dict) and LOADER_STATE_MARK in s for s in loader_states):
            checkpoint[LOADER_STATES_KEY] = fit_state.pop("combined_loader")
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        loader_states = checkpoint.pop(LOADER_STATES_KEY, None)
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        fit_state = fit_loop.get("state_dict")
        if loader_states is not None and fit_state is not None:
            fit_state["combined_loader"] = loader_states
        progress = fit_loop.get("epoch_loop.batch_progress")
        trainer = getattr(self.lightning_module, "_trainer", None)
        if (
            progress and progress["current"]["ready"] > 0 and not progress["is_last_batch"]
            and not (fit_state or {}).get("combined_loader") and trainer is not None and trainer.state.fn == "fit"
        ):
            # Lightning warns about this only for loaders without state_dict; ours has one.
            rank_zero_warn(
                "the checkpoint was saved inside an epoch but holds no position of the training data "
                "(saved without SeqParStrategy, or by an older version): the epoch's data restarts from its beginning"
            )
        states = checkpoint.get(RNG_STATES_KEY)
        if states is not None and len(states) == self.world_size:
            self._loaded_rng_state = states[self.global_rank]
            _set_rng_states(self._loaded_rng_state, self.root_device)
        elif states is not None:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} ranks, this run has "
                f"{self.world_size}: random state is not restored (dropout and augmentation draw anew)"
            )
        return checkpoint

    # ----- model -----------------------------------------------------------------------------

    def configure_ddp(self) -> None:
        # One process: DDP would copy every gradient into its buckets and all-reduce it with
        # itself each step; the unwrapped module trains identically (as SingleDeviceStrategy's).
        if self.world_size == 1:
            return
        super().configure_ddp()

    def setup(self, trainer) -> None:
        model = self.lightning_module
        if is_param_in_hook_signature(model.training_step, "dataloader_iter", explicit=True):
            raise ValueError(
                "training_step(self, dataloader_iter) fetches batches itself, bypassing the batch "
                "transfer in which SeqParStrategy cuts each sequence for its rank: write "
                "training_step(self, batch, batch_idx) instead"
            )
        self._check_cuda_graphs()
        load_installed_integrations()  # e.g. transformers models: routed by a swap hook
        self._swap = swap_attention(model)
        if self._swap.count == 0:
            self._swap = None
            raise ValueError(
                f"SeqParStrategy found no attention to run through the ring in {type(model).__name__}; "
                f"training would attend only inside each rank's chunk. nn.MultiheadAttention and modules "
                f"whose forward calls torch.nn.functional.scaled_dot_product_attention are found "
                f"automatically; for another attention module call "
                f"lightning_seqpar.register_attention(YourAttention, ring_forward)"
            )
        self._enable_cuda_graphs()
        ring_contexts.activate(RingContext(self.sp_group, self.attention, self.layout))
        # nn.TransformerEncoderLayer's inference fast path calls a fused kernel with the
        # attention weights directly, bypassing the swapped forward: chunk-local attention.
        self._fastpath_was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        model._device_mesh = self.mesh
        self.summary = (
            f"SeqParStrategy: world {self.world_size} = dp {self.dp_size} × sp {self.sp_size}, "
            f"attention {self.attention}, layout {self.layout}; through the ring: {self._swap.describe()}"
        )
        rank_zero_info(self.summary)
        if self._swap.left_alone:
            rank_zero_warn(
                f"SeqParStrategy left these attention-like modules alone (no SDPA call found in their "
                f"forward, not registered): {sorted(self._swap.left_alone)}. If they attend over the "
                f"sequence, they see only each rank's chunk: lightning_seqpar.register_attention(...)"
            )
        super().setup(trainer)

    def _check_cuda_graphs(self) -> None:
        if not self.cuda_graphs:
            return
        backend = dist.get_backend(self.sp_group)
        if self.root_device.type != "cuda" or (self.sp_size > 1 and backend not in CAPTURABLE_BACKENDS):
            raise ValueError(
                f"cuda_graphs=True needs CUDA devices and the NCCL backend; this run is on "
                f"{self.root_device.type} with {backend}: set cuda_graphs=False"
            )

    def _enable_cuda_graphs(self) -> None:
        if self.cuda_graphs:
            self._cuda_graphs_were = cuda_graphs_enabled()
            set_cuda_graphs(True)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().predict_step(*args, **kwargs)
        if self._sequence_length is None:
            return outputs
        outputs = gather_sequence(
            outputs, group=self.sp_group, layout=self.layout, seq_dim=self.seq_dim,
            local_len=self._sequence_length // self.sp_size,
        )
        if self._unpadded_length is None:
            return outputs
        seq_len, real_len, dim = self._sequence_length, self._unpadded_length, self.seq_dim

        def unpad(t: torch.Tensor, key: str | None) -> torch.Tensor:
            return t.narrow(dim, 0, real_len) if t.dim() > dim and t.size(dim) == seq_len else t

        return map_tensors(outputs, unpad)

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if any(words in str(exception) for words in _PEER_FAILURE_WORDS):
            exception.add_note(
                "SeqParStrategy: a collective broke on this rank; another rank most likely failed "
                "or stopped first: its own error, printed with its [rankN]: prefix or in its log, is "
                "the original one. A hang ends after the strategy's timeout= (a timedelta)."
            )
        self._stop_launched_ranks()

    def _stop_launched_ranks(self) -> None:
        """The process that launched the other ranks (script launcher, rank 0 of each node) ends
        them before it exits: a rank hung outside a collective would otherwise outlive the job."""
        if not isinstance(self.launcher, _SubprocessScriptLauncher):
            return
        for proc in self.launcher.procs:
            try:
                proc.wait(timeout=CHILD_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def teardown(self) -> None:
        if self._swap is not None:
            restore_attention(self._swap)
            self._swap = None
        if self._fastpath_was is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath_was)
            self._fastpath_was = None
        ring_contexts.deactivate()
        if self._cuda_graphs_were is not None:
            # The graphs hold memory and this run's process groups.
            clear_cuda_graphs()
            set_cuda_graphs(self._cuda_graphs_were)
            self._cuda_graphs_were = None
        self._position_ids = self._sequence_length = self._unpadded_length = None
        self._batches_seen = 0
        self._loaded_rng_state = None
        self._rng_again_at_train_start = False
        super().teardown()
        _die_with_launcher(False)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        entries = (
            ("seqpar", "popen", "scripts, torchrun, SLURM, multi-node"),
            ("seqpar_spawn", "spawn", "spawned processes"),
            ("seqpar_fork", "fork", "forked processes"),
            ("seqpar_notebook", "fork", "Jupyter and other interactive sessions"),
        )
        for name, start_method, use in entries:
            strategy_registry.register(
                name, cls, description=f"Sequence parallelism, start_method '{start_method}' ({use})",
                override=True, start_method=start_method,
            )

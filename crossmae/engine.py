"""The training engine: optimisation, validation, metrics, checkpoints, resume, preemption, data parallelism.

:class:`Trainer` owns everything that is not the model: the device, mixed precision,
``torch.compile``, DDP under ``torchrun`` (gloo on CPU, NCCL on GPU), AdamW with warm-up and
cosine decay, gradient clipping, the progress bar, ``metrics.csv`` / ``val_metrics.csv`` /
TensorBoard, verified checkpoints, exact resume and a clean stop on SIGTERM / SIGINT.

A step that does not log never waits for the device. The non-finite check is a device tensor
``found_inf`` (a non-finite loss on any process, or a non-finite global gradient norm) that the
fused AdamW kernel reads, as AMP's GradScaler does: a skipped step leaves the weights, the
optimizer state (step counts included) and the learning-rate schedule (:class:`WarmupCosine`,
indexed by applied updates, on the device) exactly as if it never happened. Each step's metrics
are one small device vector; the host reads them together every ``train.log_every`` steps and at
validation and checkpoint steps, writes one ``metrics.csv`` row per step and decides there whether
the run must stop (too many non-finite steps, or a signal under DDP). With ``train.cuda_graphs`` on a
CUDA device, each batch is padded to one of a few bucket sizes and the step replays that bucket's
captured CUDA graph (:class:`CudaGraphSteps`, :mod:`crossmae.data.buckets`). With ``data.on_device``
the training batches are made on the device from a device copy of the training data
(:mod:`crossmae.data.device`: the same batches as the DataLoader's; validation keeps the DataLoader).

Loss scaling across processes: each modality's sum of squared errors is divided by the
*global* count of its counted values / world size (one all-reduce of the step's counts and sums,
on the device), so DDP's gradient average equals the gradient of the loss over the whole global
batch, and 1 process with batch G matches N processes with batch G/N.

Signals: the first SIGTERM or SIGINT lets the step in progress finish; then a checkpoint is
written, ``stopped by SIGTERM at step N`` is logged and :class:`Preempted` is raised
(``train.py`` exits with :data:`EXIT_PREEMPTED`). A second signal aborts at once. Under DDP every
process must stop at the same step without a per-step host read: each step's all-reduced metric
vector carries "a process was signalled" (a device fill of a host flag, no copy), and all
processes read it at the same steps (the metric reads), so all stop together at the first read
after the signal: at most ``train.log_every`` steps later.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from crossmae.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic_text,
)
from crossmae.config import Config, config_from_dict, config_to_dict, save_config
from crossmae.data.buckets import SCAN_BATCHES, Bucket, BucketSet, batch_totals, check_kinds, pad_batch
from crossmae.data.device import DeviceCollator, DeviceDataset
from crossmae.data.loader import (
    FixedBatches,
    GlobalBatchOrder,
    build_dataset,
    keep_batch_memory_mapped,
    make_collator,
    make_loader,
)
from crossmae.model import MultimodalCrossMAE
from crossmae.packed import Packed, trust_cu_seqlens

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of ``train.py`` after a signal stopped the run and its checkpoint was written
(``EX_TEMPFAIL``: try again later): requeue the job with ``--resume``."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says why and what was kept."""


class Preempted(RuntimeError):
    """A SIGTERM or SIGINT stopped the run after a step; its checkpoint is written (``path``)."""

    def __init__(self, signal_name: str, step: int, path: Path | None):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {path}")
        self.signal_name, self.step, self.path = signal_name, step, path


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_RUN_FINISHED = False  # set when Trainer.fit returns: every rank then reaches the end of the run together


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does. After a run every rank finished, the ranks
    first meet at a barrier: a rank that closes its gloo connections while a peer is still closing its own
    makes the peer abort ("terminate called without an active exception"). After a failure there is no
    barrier (the peers may be mid-step or dead), and the barrier's wait is bounded either way."""
    if not dist.is_initialized():
        return
    failed = getattr(sys, "last_value", None) is not None  # set for an uncaught exception before atexit runs
    if _RUN_FINISHED and not failed and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except Exception:  # noqa: BLE001 - a peer that died must not stop this rank's own teardown
            pass
    dist.destroy_process_group()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device is {name!r} but no CUDA device is available")
        if name == "cuda":
            name = f"cuda:{info.local_rank}"
    return torch.device(name)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """:func:`lr_at` of the number of *applied* updates, held on the device.

    ``lr`` is a 0-d float32 device tensor that the optimizer's param groups share and read in
    place; :meth:`advance` adds ``1 - found_inf`` to the update count and refreshes ``lr`` by a
    device gather from a table of :func:`lr_at` values, so a skipped step leaves the schedule
    exactly where it was, with no host read.
    """

    def __init__(self, cfg, device: torch.device):
        self.table = torch.tensor([lr_at(s, cfg) for s in range(cfg.max_steps + 1)], dtype=torch.float32,
                                  device=device)  # [max_steps + 1]
        self.updates = torch.zeros((), dtype=torch.int64, device=device)
        self.lr = torch.empty((), dtype=torch.float32, device=device)
        self._refresh()

    def _refresh(self) -> None:
        index = self.updates.clamp(max=self.table.numel() - 1).view(1)  # [1]
        self.lr.copy_(self.table.index_select(0, index).view(()))

    def advance(self, found_inf: torch.Tensor) -> None:
        """Count one update unless ``found_inf`` (0-d, 1 = skipped) says the step was skipped."""
        self.updates += 1 - found_inf.to(torch.int64)
        self._refresh()

    def state_dict(self) -> dict:
        return {"updates": self.updates.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.updates.copy_(state["updates"])
        self._refresh()


class StopSignals:
    """While active, the first SIGTERM or SIGINT only sets :attr:`received` (its name); a second one
    restores the default action and re-sends itself, so the process ends at once.

    Installed only in the main thread (Python delivers signals there); elsewhere it does nothing. A
    process forked while it is active ignores the signals it inherits this handler for; DataLoader
    workers are shielded by :func:`shield_workers`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child: the main process decides
            return
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        os.write(2, f"\n{self.received} received: finishing the step, then writing a checkpoint "
                    f"(send it again to abort at once)\n".encode())

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _ignore_stop_signals(worker_id: int, then=None) -> None:
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def shield_workers(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """Make ``loader``'s worker processes ignore SIGTERM and SIGINT (set when each starts, after PyTorch's own
    worker handlers), so a signal sent to the whole process group (Ctrl-C, a scheduler) leaves the data
    flowing while the main process finishes its step; workers still exit with the main process."""
    loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=loader.worker_init_fn)
    return loader


class HostSyncCounter(TorchDispatchMode):
    """Counts aten ops and the ones that make the host wait for the device, while active.

    ``syncs`` counts ``_local_scalar_dense`` / ``item`` (``.item()``, ``float(t)``, ``bool(t)``),
    ``nonzero`` (its output size depends on the data) and copies from a non-CPU device to the
    CPU; ``reads`` counts Python-level reads that wait on a GPU (``.tolist()``, ``.cpu()``,
    ``.numpy()``, ``.item()`` and ``bool``/``float``/``int`` of a tensor), which on a CPU machine
    are no device sync but would be one on a GPU. ``names`` lists each sync-like op seen.
    """

    SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero")

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.names: list[str] = []
        self._reads = _HostReadCounter()

    @property
    def reads(self) -> int:
        return self._reads.count

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._reads.__exit__(*exc)
        self.names += self._reads.names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        sync = name in self.SYNC_OPS
        if name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst_cpu = (args[0].device.type == "cpu") if name == "aten.copy_" else \
                torch.device(kwargs.get("device") or src.device).type == "cpu"
            sync = src.device.type != "cpu" and dst_cpu
        if sync:
            self.syncs += 1
            self.names.append(name)
        return func(*args, **kwargs)


class _HostReadCounter(TorchFunctionMode):
    """Python-level tensor reads by the host (see :class:`HostSyncCounter`)."""

    READS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
            self.names.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class MetricsLog:
    """Append-only CSV with a fixed header; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        lines = [",".join(self.columns)] + [",".join(r.get(c, "") for c in self.columns) for r in rows]
        write_atomic_text(self.path, "\n".join(lines) + "\n")

    def append(self, row: dict) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow({c: row.get(c, "") for c in self.columns})


def _file_fingerprint(path: str) -> dict:
    """Size (bytes) and newest modification time (ns) of a file, or of every file under a folder (a Zarr store)."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    size, mtime = 0, 0
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return {"bytes": size, "mtime_ns": mtime}


def data_fingerprint(config: Config, dataset) -> dict:
    """What resuming checks about the data: ``{"files": {path: {bytes, mtime_ns}}, "grids": {name: [C, H, W]}}``.

    ``files`` lists every configured file of a ``files`` source for the data set's basins (grids,
    their masks, series, static tables, the basin list), or every file a ``region`` source read; a
    synthetic source has none.
    """
    from crossmae.data.readers import resolve_path

    grids = {m.name: [m.channels, m.height, m.width] for m in dataset.spec.modalities if m.kind == "grid"}
    if config.data.source == "region":
        return {"files": {p: _file_fingerprint(p) for p in sorted(set(dataset.data_paths)) if os.path.exists(p)},
                "grids": grids}
    if config.data.source != "files":
        return {"files": {}, "grids": grids}
    f = config.data.files
    root = f.root or os.getcwd()

    def path_of(template: str, basin: str) -> str:
        path = os.path.expanduser(template.replace("{basin}", basin))
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))

    templates = [t for src in f.grids for t in (src.path, src.mask_path) if t]
    templates += [src.path for src in f.series]
    paths = {path_of(t, b) for t in templates for b in dataset.basins}
    paths |= {path_of(t, "") for t in [*f.static.paths, *([f.basins_file] if f.basins_file else [])]}
    files = {}
    for pattern in sorted(paths):
        try:
            path = resolve_path(pattern, "data file")
        except FileNotFoundError:
            continue
        files[path] = _file_fingerprint(path)
    return {"files": files, "grids": grids}


def data_changes(before: dict, now: dict) -> list[str]:
    """What differs between two :func:`data_fingerprint` results, one phrase per file or grid."""
    changes = []
    old, new = before.get("files", {}), now.get("files", {})
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None:
            changes.append(f"{path} (not read when the run started)")
        elif b is None:
            changes.append(f"{path} (no longer found)")
        elif a["bytes"] != b["bytes"]:
            changes.append(f"{path} (size {a['bytes']} -> {b['bytes']} bytes)")
        else:
            changes.append(f"{path} (modified since the run started)")
    for name in sorted(set(before.get("grids", {})) | set(now.get("grids", {}))):
        a, b = before.get("grids", {}).get(name), now.get("grids", {}).get(name)
        if a != b:
            changes.append(f"grid {name!r} (shape [C, H, W] {a} -> {b})")
    return changes


def mark_rows_dynamic(obj) -> None:
    """Mark dim 0 (the packed rows) of every tensor in a batch as dynamic for ``torch.compile``, so a first
    batch whose row count happens to equal a constant does not get a graph specialised to it."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(obj, 0)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            mark_rows_dynamic(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for value in obj.values():
            mark_rows_dynamic(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            mark_rows_dynamic(value)


def _copy_into(static, new) -> None:
    """Copy every tensor of the padded batch ``new`` into the same-shaped tensor of ``static`` (CUDA graph input
    buffers), re-recording each ``cu_seqlens``' summary (a copy bumps its version)."""
    if isinstance(static, torch.Tensor):
        static.copy_(new, non_blocking=True)
    elif isinstance(static, Packed):
        static.cu_seqlens.copy_(new.cu_seqlens, non_blocking=True)
        min_len = int(new.lengths.min()) if new.lengths.numel() else 0
        trust_cu_seqlens(static.cu_seqlens, total=new.total, max_len=int(new.lengths.max()), min_len=min_len)
    elif isinstance(static, dict):
        for key, value in static.items():
            _copy_into(value, new[key])
    elif dataclasses.is_dataclass(static) and not isinstance(static, type):
        for f in dataclasses.fields(static):
            _copy_into(getattr(static, f.name), getattr(new, f.name))


class CudaGraphSteps:
    """The training step as one captured CUDA graph per bucket of padded batch sizes (``train.cuda_graphs``).

    Each batch is padded to its bucket (:mod:`crossmae.data.buckets`); the first padded batch of a bucket (fresh
    tensors) becomes that bucket's static input buffers and runs :data:`WARMUP_STEPS` eager steps with the update
    forced off on a side stream (Triton and cuBLAS set themselves up; weights, optimizer state and schedule stay
    as they were), then the whole step is captured: forward, backward, gradient clipping, the fused AdamW update
    (``capturable``, its learning rate and ``found_inf`` device tensors) and the schedule's advance. Later
    batches of the bucket are copied into its buffers and the graph replays. Each graph keeps its own memory
    pool. The returned metric vector is a copy of the graph's output (the next replay overwrites it).

    Args:
        trainer: the trainer whose :meth:`Trainer.step_body` is captured.
        buckets: the bucket sizes.
    """

    WARMUP_STEPS = 2

    def __init__(self, trainer: Trainer, buckets: BucketSet):
        self.trainer, self.buckets = trainer, buckets
        self.graphs: dict[Bucket, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        self.replays = 0
        self._run = torch.zeros((), dtype=torch.float32, device=trainer.device)
        self._warm = torch.ones((), dtype=torch.float32, device=trainer.device)

    def _capture(self, static) -> tuple[torch.cuda.CUDAGraph, object, torch.Tensor]:
        """Warm up and capture the step on ``static``, a padded batch of fresh tensors that becomes the bucket's
        input buffers."""
        trainer = self.trainer
        side = torch.cuda.Stream(trainer.device)
        side.wait_stream(torch.cuda.current_stream(trainer.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                trainer.step_body(static, skip=self._warm)
        torch.cuda.current_stream(trainer.device).wait_stream(side)
        trainer.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            metrics = trainer.step_body(static, skip=self._run)
        return graph, static, metrics

    def _fall_back(self, batch, exc: RuntimeError) -> torch.Tensor:
        """A capture failed: say why, run this and every later step eagerly (a failed capture ran nothing on the
        device, so weights, optimizer state and schedule are as they were)."""
        trainer = self.trainer
        trainer._say(f"train.cuda_graphs: capturing the training step failed ({exc}); the steps run eagerly, "
                     f"unpadded, from step {trainer.step + 1}", warn=True)
        trainer.graph_steps = None
        trainer.optimizer.zero_grad(set_to_none=True)
        return trainer.step_body(batch)

    def __call__(self, batch) -> torch.Tensor:
        """One training step on ``batch`` (on the trainer's device); returns its metric vector."""
        bucket = self.buckets.choose(batch_totals(batch))
        padded = pad_batch(batch, bucket)
        entry = self.graphs.get(bucket)
        if entry is None:
            try:
                entry = self.graphs[bucket] = self._capture(padded)
            except RuntimeError as exc:
                return self._fall_back(batch, exc)
            log.info("captured the training step for bucket %d of %d (%d token rows)",
                     self.buckets.buckets.index(bucket) + 1, len(self.buckets.buckets), bucket.rows)
        else:
            _copy_into(entry[1], padded)
        entry[0].replay()
        self.replays += 1
        return entry[2].clone()


class Trainer:
    """Train a :class:`MultimodalCrossMAE` as ``config`` says.

    Args:
        config: the resolved configuration (its ``train.out_dir`` is the run folder).
        resume: continue the run in ``train.out_dir`` from its newest intact checkpoint.

    Raises:
        FileNotFoundError: ``resume`` and the run has no checkpoint.
        CheckpointError: ``resume`` and none of the run's checkpoints is intact.
        FileExistsError: not ``resume`` and the run folder already holds a run.
    """

    def __init__(self, config: Config, resume: bool = False):
        self.config = config
        cfg = config.train
        if cfg.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be at least 1, got {cfg.keep_checkpoints}")
        if cfg.log_every < 1:
            raise ValueError(f"train.log_every must be at least 1, got {cfg.log_every}")
        wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        device_type = "cuda" if wants_cuda else "cpu"
        self.dist = init_distributed(device_type)
        self.device = resolve_device(cfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg.out_dir)
        checkpoint, state, weights = None, None, None
        if resume:
            try:
                checkpoint, damaged = resume_checkpoint(self.run_dir)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"--resume: {exc}") from None
            except CheckpointError as exc:
                raise CheckpointError(f"--resume: {exc}") from None
            for check in damaged:
                self._say(f"checkpoint {check.path} is damaged: {check.problem}", warn=True)
            if damaged:
                self._say(f"resuming from {checkpoint.name}, the newest intact checkpoint", warn=True)
            weights, state = load_checkpoint(checkpoint, map_location="cpu")
        elif (self.run_dir / "checkpoints").exists():
            raise FileExistsError(
                f"{str(self.run_dir)!r} already holds a run; pass --resume to continue it or choose another --out-dir"
            )

        # -- data: statistics from the training split (the run's own when resuming), reused by validation --
        norm_stats = json.loads(state["norm_stats"]) if state is not None else None
        keep_batch_memory_mapped()
        self.train_set = build_dataset(config.data, "train", norm_stats=norm_stats)
        self.val_set = build_dataset(config.data, "val", norm_stats=self.train_set.norm_stats) \
            if cfg.val_every > 0 else None
        self.collator = make_collator(config, self.train_set)
        self.device_batches = None  # with data.on_device: window keys → a batch made on the device
        self.data_files = data_fingerprint(config, self.train_set)
        if state is not None and "data_files" in state:
            changes = data_changes(json.loads(state["data_files"]), self.data_files)
            if changes:
                self._say("the data changed since the run started: " + "; ".join(changes)
                          + ". Training goes on with the run's normalisation statistics.", warn=True)

        # -- model and optimisation --
        torch.manual_seed(cfg.seed)
        self.model = MultimodalCrossMAE(
            self.train_set.spec, config.model, patch_size=config.data.patch_size, steps=config.data.steps,
            fused=cfg.fused,
        ).to(self.device)
        self.schedule = WarmupCosine(cfg, self.device)
        self.loss_weights = torch.tensor([config.model.loss_weights.get(m, 1.0) for m in self.model.names],
                                         dtype=torch.float64, device=self.device)  # [n]
        self._signalled = torch.zeros(1, dtype=torch.float64, device=self.device)  # [1] a stop signal arrived
        graphs_refused = self._cuda_graphs_refused() if cfg.cuda_graphs else None
        if graphs_refused:
            self._say(f"train.cuda_graphs is on, but {graphs_refused}: the steps run eagerly, unpadded", warn=True)
        self.capturable = cfg.cuda_graphs and not graphs_refused
        self.optimizer = self._make_optimizer(capturable=self.capturable)
        self.step = 0
        self.nonfinite_run = 0
        if checkpoint is not None:
            self._restore(checkpoint, weights, state)
        self.forward_model = self.model
        if self.dist.enabled:
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model, dynamic=True)
        if config.data.on_device:
            self.device_batches = DeviceCollator(self.collator, DeviceDataset(self.train_set, self.device,
                                                                                config.data.patch_size))
        self.graph_steps = None
        if cfg.cuda_graphs and not graphs_refused:
            self.graph_steps = CudaGraphSteps(self, self._scan_buckets())
        amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        # a captured graph must not hold autocast's cast weights: its cache is emptied when the context exits
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                cache_enabled=self.graph_steps is None)) if amp \
            else contextlib.nullcontext

        names = list(self.model.names)
        self.metric_names = ["loss", *[f"loss_{n}" for n in names], "lr", "grad_norm", "skipped", "signalled"]
        self.train_log = MetricsLog(
            self.run_dir / "metrics.csv",
            ["step", "loss", *[f"loss_{n}" for n in names], "lr", "grad_norm", "tokens_per_s", "samples_per_s",
             "skipped"],
        )
        self.val_log = MetricsLog(
            self.run_dir / "val_metrics.csv", ["step", "val_loss", *[f"val_loss_{n}" for n in names]]
        )
        self.writer = None
        self.signals = StopSignals()
        self._saved: tuple[int, Path | None] | None = None  # (step, path) of the last checkpoint written

    # -- set-up helpers ------------------------------------------------------------------------
    def _say(self, message: str, warn: bool = False) -> None:
        """Print ``message`` on the main process (and log it as a warning when ``warn``)."""
        if self.dist.is_main:
            if warn:
                log.warning(message)
            else:
                print(message, flush=True)

    def _cuda_graphs_refused(self) -> str | None:
        """Why ``train.cuda_graphs`` can't be used in this run (None: it can)."""
        cfg = self.config.train
        if self.device.type != "cuda":
            return f"train.device resolves to {self.device} (CUDA graphs need a CUDA device)"
        if self.dist.enabled:
            return "the run is data-parallel (its all-reduces are not captured)"
        if cfg.compile:
            return "train.compile is on too (choose one)"
        if not cfg.fused:
            return "train.fused is off (the padded and loop layouts pad every sample to the bucket's max_seqlen)"
        try:
            check_kinds({m.name: m.kind for m in self.train_set.spec.modalities}, "train.cuda_graphs")
        except ValueError as exc:
            return str(exc)
        return None

    def _scan_buckets(self) -> BucketSet:
        """Bucket sizes from the totals of the run's first :data:`crossmae.data.buckets.SCAN_BATCHES` batches."""
        data = self.config.data
        order = GlobalBatchOrder(len(self.train_set), data.batch_size, self.config.train.seed, self.dist.rank,
                                 self.dist.world)
        count = min(SCAN_BATCHES, order.per_epoch)
        totals = [batch_totals(self.collator([self.train_set[key] for key in order.batch(k)])) for k in range(count)]
        buckets = BucketSet.from_totals(totals)
        self._say(f"CUDA graphs: {len(buckets.buckets)} buckets from {count} batches, "
                  f"{', '.join(str(b.rows) for b in buckets.buckets)} token rows")
        return buckets

    def _make_optimizer(self, capturable: bool = False) -> torch.optim.Optimizer:
        """AdamW with the fused kernel (CUDA and CPU): it takes a device ``lr`` and ``found_inf``; ``capturable``
        for CUDA graphs."""
        cfg = self.config.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "feature_weights" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.schedule.lr, betas=(cfg.beta1, cfg.beta2), fused=True,
                                 capturable=capturable)

    def _restore(self, path: Path, weights: dict, state: dict) -> None:
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr
            group["capturable"] = self.capturable  # this run's choice, not the checkpointed run's
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        self._say(f"resumed from {path} at step {self.step}")

    def _state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "step": self.step,
            "data_position": self.step,
            "rng": rng_state(),
            "config": json.dumps(config_to_dict(self.config)),
            "norm_stats": json.dumps(self.train_set.norm_stats),
            "data_files": json.dumps(self.data_files),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step (main process only; the others wait for its verdict).

        Raises:
            TrainingStopped: the checkpoint could not be written (on every process).
        """
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        path, error = None, None
        if self.dist.is_main:
            try:
                path = save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self._state(),
                                       keep=self.config.train.keep_checkpoints)
            except CheckpointError as exc:
                error = str(exc)
        if self.dist.enabled:
            failed = torch.tensor([float(error is not None)], device=self.device)
            dist.all_reduce(failed)  # also the barrier: nobody goes on before the checkpoint is on disk
            if error is None and failed.item() > 0:
                error = "process 0 could not write the checkpoint (its log says why)"
        if error is not None:
            raise TrainingStopped(f"{error}. Stopping at step {self.step}.")
        self._saved = (self.step, path)
        return path

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, batch) -> torch.Tensor:
        """Forward, backward, clip and (unless non-finite) update on one batch, with no host read.

        With CUDA graphs on (:attr:`graph_steps`), the batch is padded to its bucket and the bucket's captured
        step replays.

        Returns:
            ``[len(metric_names)]`` float64 device vector: the global loss, each modality's global
            loss, the learning rate used, the global gradient norm, skipped (1 when the update was
            skipped) and signalled (1 when a process had received a stop signal; DDP only).
        """
        self.model.train()
        self._signalled.fill_(float(self.signals.received is not None))
        if self.graph_steps is not None:
            return self.graph_steps(batch)
        if self.config.train.compile:
            self.model.check_batch(batch)  # eager, so the compiled graph never sees the check's state change
            mark_rows_dynamic(batch)
        return self.step_body(batch)

    def step_body(self, batch, skip: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`train_step`'s work on the device (what a CUDA graph captures): ``skip`` (0-d float, 1 = skip)
        forces the update to be skipped, leaving weights, optimizer state and schedule as they were."""
        cfg = self.config.train
        names = self.model.names
        n = len(names)
        with self.autocast():
            out = self.forward_model(batch)
        # one reduction: counted values and sums per modality, a non-finite flag and the stop flag
        stats = torch.cat([
            torch.stack([out.counts[m].detach().double() for m in names]),
            torch.stack([out.sums[m].detach().double() for m in names]),
            (~torch.isfinite(out.loss.detach())).double().view(1),
            self._signalled,
        ])  # [2n + 2]
        loss = out.loss
        if self.dist.enabled:
            dist.all_reduce(stats)
            norm = (stats[:n] / self.dist.world).clamp_min(1e-12)  # [n] global counts / world
            weights = self.model.cfg.loss_weights
            loss = sum(weights.get(m, 1.0) * out.sums[m] / norm[i].to(out.sums[m].dtype) for i, m in enumerate(names))
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        found_inf = ((stats[2 * n] > 0) | ~torch.isfinite(grad_norm)).float()
        if skip is not None:
            found_inf = torch.maximum(found_inf, skip)
        self.optimizer.found_inf = found_inf  # the fused kernel skips the update and undoes the step count
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule.lr.double().view(1)  # the lr this step used, before the schedule moves
        self.schedule.advance(found_inf)
        counted = stats[:n] > 0  # [n] a modality may have no value to score in a batch (a site set without gauges)
        losses = torch.where(counted, stats[n:2 * n] / stats[:n].clamp_min(1e-12), torch.nan)  # [n] NaN: no value
        total = torch.where(counted, losses * self.loss_weights, 0.0).sum().view(1)
        return torch.cat([total, losses, lr, grad_norm.detach().double().view(1), found_inf.double().view(1),
                          stats[2 * n + 1:]])

    def metrics_row(self, values: list[float]) -> dict:
        """A metric vector of :meth:`train_step`, read to the host, as ``{name: value}``."""
        return dict(zip(self.metric_names, values))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Per-modality masked MSE over the fixed validation batches (all processes)."""
        names = self.model.names
        batches = FixedBatches(len(self.val_set), self.config.data.batch_size, self.config.train.val_batches,
                               seed=self.config.train.seed + 1, rank=self.dist.rank, world=self.dist.world)
        loader = shield_workers(make_loader(self.val_set, batches, self.collator, self.config.data.num_workers,
                                            self.device.type == "cuda"))
        totals = torch.zeros(2 * len(names), dtype=torch.float64, device=self.device)
        self.model.eval()
        for batch in loader:
            batch = batch.to(self.device)
            with self.autocast():
                out = self.model(batch)
            totals += torch.stack([*(out.sums[m].double() for m in names), *(out.counts[m].double() for m in names)])
        if self.dist.enabled:
            dist.all_reduce(totals)
        totals = totals.tolist()
        result = {n: totals[i] / totals[len(names) + i] if totals[len(names) + i] > 0 else float("nan")
                  for i, n in enumerate(names)}
        result["val_loss"] = sum(self.model.cfg.loss_weights.get(n, 1.0) * v for n, v in result.items()
                                 if not math.isnan(v))
        return result

    # -- the loop ------------------------------------------------------------------------------
    def _log(self, row: dict, val: dict | None = None) -> None:
        if not self.dist.is_main:
            return
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self.writer = False
                log.warning("tensorboard is not installed: metrics go to CSV only")
        if val is None:
            self.train_log.append(row)
            tags = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        else:
            self.val_log.append({"step": row["step"], **{("val_loss" if k == "val_loss" else f"val_loss_{k}"): v
                                                         for k, v in val.items()}})
            tags = {("val/loss" if k == "val_loss" else f"val/loss_{k}"): v for k, v in val.items()}
        if self.writer:
            for tag, value in tags.items():
                self.writer.add_scalar(tag if "/" in tag else f"train/{tag}", value, row["step"])

    def _read_metrics(self, pending: list[torch.Tensor], tokens: int, seconds: float, progress) -> tuple[dict, bool]:
        """Read the pending steps' metric vectors (one device→host copy), log one row per step, and check the
        non-finite rule. Returns (the last row, whether a process was signalled)."""
        cfg, data = self.config.train, self.config.data
        values = torch.stack(pending).tolist()  # [steps, len(metric_names)]
        first = self.step - len(values) + 1
        row, signalled, too_many = {}, False, None
        for offset, vector in enumerate(values):
            step = first + offset
            metrics = self.metrics_row(vector)
            skipped = metrics["skipped"] > 0
            signalled = signalled or metrics["signalled"] > 0
            row = {
                "step": step, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                "tokens_per_s": tokens / seconds, "samples_per_s": data.batch_size * self.dist.world * len(values)
                / seconds, "skipped": int(skipped),
                **{f"loss_{n}": metrics[f"loss_{n}"] for n in self.model.names},
            }
            self._log(row)
            self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
            if self.nonfinite_run >= cfg.max_nonfinite_steps and too_many is None:
                too_many = (self.nonfinite_run, step)
            if skipped:
                message = f"step {step}: non-finite loss or gradient, update skipped"
                if self.dist.is_main:
                    log.warning(message)
                    if progress is not None:
                        progress.write(message)
        if progress is not None:
            progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tokens / seconds:,.0f}", refresh=False)
        if too_many is not None:
            path = self.save()  # the weights are the last good ones: skipped steps change nothing
            raise TrainingStopped(
                f"the loss or gradient was non-finite for {too_many[0]} steps in a row (up to step {too_many[1]}); "
                f"stopping at step {self.step}. Last good weights: {path or self.run_dir}"
            )
        return row, signalled

    def _share_kernel_choices(self) -> None:
        """Under DDP, make every rank launch the Triton kernel configurations rank 0's autotuner chose (timing
        differs between GPUs, and ranks that tune alone stop being bit-identical). Runs at each metrics read,
        which already waits for the device, so shapes first met since the last read are shared too."""
        kernels = sys.modules.get("crossmae_kernels.varlen_attention")
        if self.dist.enabled and kernels is not None:
            kernels.broadcast_autotune_choice()

    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns the last metrics.

        Raises:
            TrainingStopped: the loss stayed non-finite, or a checkpoint could not be written.
            Preempted: a SIGTERM / SIGINT stopped the run; its checkpoint is written.
        """
        cfg, data = self.config.train, self.config.data
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            write_atomic_text(self.run_dir / "norm_stats.json", json.dumps(self.train_set.norm_stats, indent=1))
            self.train_log.truncate_after(self.step)
            self.val_log.truncate_after(self.step)
        batches = GlobalBatchOrder(len(self.train_set), data.batch_size, cfg.seed, self.dist.rank, self.dist.world,
                                   start_step=self.step)
        progress = None
        if self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last, pending, tokens, stopped_by = {}, [], 0, None
        t0 = time.perf_counter()
        try:
            with self.signals:
                if self.device_batches is not None:
                    loader = (self.device_batches(keys) for keys in batches)
                else:
                    loader = iter(shield_workers(make_loader(self.train_set, batches, self.collator,
                                                             data.num_workers, self.device.type == "cuda")))
                while self.step < cfg.max_steps:
                    if not self.dist.enabled and self.signals.received:
                        stopped_by = self.signals.received
                        break
                    batch = next(loader).to(self.device, non_blocking=True)
                    tokens += batch.num_tokens * self.dist.world
                    pending.append(self.train_step(batch))
                    self.step += 1
                    if progress is not None:
                        progress.update(1)
                    validate = self.val_set is not None and (self.step % cfg.val_every == 0
                                                             or self.step == cfg.max_steps)
                    checkpoint = (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0) or self.step == cfg.max_steps
                    if self.step % cfg.log_every == 0 or validate or checkpoint:
                        seconds = time.perf_counter() - t0  # the read below waits for the device first
                        last, signalled = self._read_metrics(pending, tokens, max(seconds, 1e-9), progress)
                        self._share_kernel_choices()
                        pending, tokens, t0 = [], 0, time.perf_counter()
                        if signalled:
                            stopped_by = self.signals.received or "a signal to another process"
                            break
                    if validate:
                        val = self.validate()
                        self._log({"step": self.step}, val)
                        if progress is not None:
                            progress.write(f"step {self.step}: val loss {val['val_loss']:.4f} " + " ".join(
                                f"{k}={v:.4f}" for k, v in val.items() if k != "val_loss"))
                        last["val"] = val
                    if checkpoint:
                        self.save()
                if stopped_by is not None:
                    if pending:
                        last, _ = self._read_metrics(pending, tokens, max(time.perf_counter() - t0, 1e-9), progress)
                    path = self.save()
                    message = f"stopped by {stopped_by} at step {self.step}; checkpoint {path or self.run_dir}"
                    self._say(message, warn=True)
                    raise Preempted(stopped_by, self.step, path)
        finally:
            if progress is not None:
                progress.close()
            if self.writer:
                self.writer.flush()
        global _RUN_FINISHED
        _RUN_FINISHED = True
        return last


def load_run_config(run_dir: Path) -> Config:
    """The configuration a run was started with (from its newest intact checkpoint, else config.yaml).

    Raises:
        CheckpointError: the run has checkpoints but none is intact.
        FileNotFoundError: the folder holds no run.
    """
    try:
        checkpoint, _ = resume_checkpoint(run_dir)
    except FileNotFoundError:
        checkpoint = None
    if checkpoint is not None:
        _, state = load_checkpoint(checkpoint)
        return config_from_dict(json.loads(state["config"]))
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no run (no checkpoints, no config.yaml)")
    from crossmae.config import load_yaml

    return config_from_dict(load_yaml(path))

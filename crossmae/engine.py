"""The training engine: optimisation, validation, metrics, checkpoints, resume, data parallelism.

:class:`Trainer` owns everything that is not the model: the device, mixed precision,
``torch.compile``, DDP under ``torchrun`` (gloo on CPU, NCCL on GPU), AdamW with warm-up and
cosine decay, gradient clipping, the progress bar, ``metrics.csv`` / ``val_metrics.csv`` /
TensorBoard, atomic checkpoints and exact resume.

Loss scaling across processes: each modality's sum of squared errors is divided by the
*global* number of counted values / world size, so DDP's gradient average equals the gradient
of the loss over the whole global batch, and 1 process with batch G matches N processes with
batch G/N.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from crossmae.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic_text,
)
from crossmae.config import Config, config_from_dict, config_to_dict, save_config
from crossmae.data.loader import FixedBatches, GlobalBatchOrder, build_dataset, make_collator, make_loader
from crossmae.model import MultimodalCrossMAE

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says why and what was kept."""


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


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
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


class Trainer:
    """Train a :class:`MultimodalCrossMAE` as ``config`` says.

    Args:
        config: the resolved configuration (its ``train.out_dir`` is the run folder).
        resume: continue the run in ``train.out_dir`` from its latest checkpoint.
    """

    def __init__(self, config: Config, resume: bool = False):
        self.config = config
        cfg = config.train
        wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        device_type = "cuda" if wants_cuda else "cpu"
        self.dist = init_distributed(device_type)
        self.device = resolve_device(cfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg.out_dir)
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {str(self.run_dir / 'checkpoints')!r}")
        if not resume and (self.run_dir / "checkpoints").exists():
            raise FileExistsError(
                f"{str(self.run_dir)!r} already holds a run; pass --resume to continue it or choose another --out-dir"
            )

        # -- data: statistics from the training split, reused by validation --
        self.train_set = build_dataset(config.data, "train")
        self.val_set = build_dataset(config.data, "val", norm_stats=self.train_set.norm_stats) \
            if cfg.val_every > 0 else None
        self.collator = make_collator(config, self.train_set)

        # -- model and optimisation --
        torch.manual_seed(cfg.seed)
        self.model = MultimodalCrossMAE(
            self.train_set.spec, config.model, patch_size=config.data.patch_size, steps=config.data.steps,
            fused=cfg.fused,
        ).to(self.device)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, cfg) / cfg.lr)
        self.step = 0
        self.nonfinite_run = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.forward_model = self.model
        if self.dist.enabled:
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model, dynamic=True)
        amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if amp \
            else contextlib.nullcontext

        names = list(self.model.names)
        self.train_log = MetricsLog(
            self.run_dir / "metrics.csv",
            ["step", "loss", *[f"loss_{n}" for n in names], "lr", "grad_norm", "tokens_per_s", "samples_per_s",
             "skipped"],
        )
        self.val_log = MetricsLog(
            self.run_dir / "val_metrics.csv", ["step", "val_loss", *[f"val_loss_{n}" for n in names]]
        )
        self.writer = None

    # -- set-up helpers ------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "feature_weights" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def _restore(self, path: Path) -> None:
        weights, state = load_checkpoint(path, map_location="cpu")
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data_position": self.step,
            "rng": rng_state(),
            "config": json.dumps(config_to_dict(self.config)),
            "norm_stats": json.dumps(self.train_set.norm_stats),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step (main process only; the others wait)."""
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self._state(),
                                   keep=self.config.train.keep_checkpoints)
        if self.dist.enabled:
            dist.barrier()
        return path

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled:
            dist.all_reduce(t)
        return t

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        """Forward, backward, clip and update on one batch; returns the step's metrics (global)."""
        cfg = self.config.train
        names = self.model.names
        local = self.model.loss_counts(batch)
        counts = self._all_reduce(torch.stack([local[n].double() for n in names]))  # global counts per modality
        normalizers = {n: counts[i] / self.dist.world for i, n in enumerate(names)}
        self.model.train()
        with self.autocast():
            out = self.forward_model(batch, normalizers)
        # global per-modality sums of squares and a finite flag, in one reduction
        stats = torch.stack([*(out.sums[n].detach().double() for n in names), torch.isfinite(out.loss).double()])
        stats[-1] = 1.0 - stats[-1]
        stats = self._all_reduce(stats).cpu()
        finite = stats[-1].item() == 0
        losses = {n: (stats[i].item() / counts[i].item() if counts[i] > 0 else 0.0) for i, n in enumerate(names)}
        loss = sum(self.model.cfg.loss_weights.get(n, 1.0) * v for n, v in losses.items())
        grad_norm = float("nan")
        if finite:
            out.loss.backward()
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
            finite = math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": loss, "losses": losses, "grad_norm": grad_norm, "finite": finite}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Per-modality masked MSE over the fixed validation batches (all processes)."""
        names = self.model.names
        batches = FixedBatches(len(self.val_set), self.config.data.batch_size, self.config.train.val_batches,
                               seed=self.config.train.seed + 1, rank=self.dist.rank, world=self.dist.world)
        loader = make_loader(self.val_set, batches, self.collator, self.config.data.num_workers,
                             self.device.type == "cuda")
        totals = torch.zeros(2 * len(names), dtype=torch.float64, device=self.device)
        self.model.eval()
        for batch in loader:
            batch = batch.to(self.device)
            with self.autocast():
                out = self.model(batch)
            for i, n in enumerate(names):
                totals[i] += out.sums[n].double()
                totals[len(names) + i] += out.counts[n].double()
        totals = self._all_reduce(totals).tolist()
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

    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns the last metrics. Raises :class:`TrainingStopped`."""
        cfg, data = self.config.train, self.config.data
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            write_atomic_text(self.run_dir / "norm_stats.json", json.dumps(self.train_set.norm_stats, indent=1))
            self.train_log.truncate_after(self.step)
            self.val_log.truncate_after(self.step)
        batches = GlobalBatchOrder(len(self.train_set), data.batch_size, cfg.seed, self.dist.rank, self.dist.world,
                                   start_step=self.step)
        loader = iter(make_loader(self.train_set, batches, self.collator, data.num_workers,
                                  self.device.type == "cuda"))
        progress = None
        if self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last = {}
        t0 = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                batch = next(loader).to(self.device, non_blocking=True)
                tokens = batch.num_tokens * self.dist.world
                lr = self.scheduler.get_last_lr()[0]
                result = self.train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                dt, t0 = now - t0, now
                self.step += 1
                self.nonfinite_run = 0 if result["finite"] else self.nonfinite_run + 1
                row = {
                    "step": self.step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                    "tokens_per_s": tokens / dt, "samples_per_s": data.batch_size * self.dist.world / dt,
                    "skipped": int(not result["finite"]),
                    **{f"loss_{n}": v for n, v in result["losses"].items()},
                }
                self._log(row)
                last = row
                if progress is not None:
                    progress.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
                    progress.update(1)
                if not result["finite"]:
                    if self.dist.is_main:
                        log.warning("step %d: non-finite loss or gradient, update skipped", self.step)
                        if progress is not None:
                            progress.write(f"step {self.step}: non-finite loss or gradient, update skipped")
                    if self.nonfinite_run >= cfg.max_nonfinite_steps:
                        path = self.save()  # the weights are the last good ones: skipped steps change nothing
                        raise TrainingStopped(
                            f"the loss or gradient was non-finite for {self.nonfinite_run} steps in a row "
                            f"(up to step {self.step}); stopping. Last good weights: {path or self.run_dir}"
                        )
                if self.val_set is not None and cfg.val_every > 0 and (
                        self.step % cfg.val_every == 0 or self.step == cfg.max_steps):
                    val = self.validate()
                    self._log({"step": self.step}, val)
                    if progress is not None:
                        progress.write(f"step {self.step}: val loss {val['val_loss']:.4f} " + " ".join(
                            f"{k}={v:.4f}" for k, v in val.items() if k != "val_loss"))
                    last["val"] = val
                if (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0) or self.step == cfg.max_steps:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            if self.writer:
                self.writer.flush()
        return last


def load_run_config(run_dir: Path) -> Config:
    """The configuration a run was started with (from its latest checkpoint, else config.yaml)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        _, state = load_checkpoint(checkpoint)
        return config_from_dict(json.loads(state["config"]))
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no run (no checkpoints, no config.yaml)")
    from crossmae.config import load_yaml

    return config_from_dict(load_yaml(path))

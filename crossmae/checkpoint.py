"""Checkpoints: written atomically, read with ``weights_only``.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXXX/`` holding
    model.safetensors   the model's weights
    state.pt            optimizer, scheduler, step, RNG states, data position, config, normalisation
It is written into a temporary sibling folder, flushed, then renamed into place; the file
``<run>/checkpoints/latest`` (the newest complete checkpoint's name) is replaced atomically
afterwards. A crash at any moment leaves the previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model_state: dict, state: dict, keep: int = 2) -> Path:
    """Write ``step``'s checkpoint atomically, point ``latest`` at it, keep the ``keep`` newest."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # same step written again (e.g. the final step was also periodic)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic_text(root / LATEST, name + "\n")
    existing = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in existing[: max(0, len(existing) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file() else None


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict, dict]:
    """(model weights, training state) of a checkpoint folder; raises FileNotFoundError naming what is missing."""
    path = Path(path)
    for f in (MODEL_FILE, STATE_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {f}")
    weights = load_file(str(path / MODEL_FILE), device=str(map_location))
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    return weights, state

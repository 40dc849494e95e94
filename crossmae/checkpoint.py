"""Checkpoints: written atomically, verified by checksum, read with ``weights_only``.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXXX/`` holding
    model.safetensors   the model's weights
    state.pt            optimizer, scheduler, step, RNG states, data position, config, normalisation,
                        the data files' fingerprint
    manifest.json       ``{"step": N, "files": {name: {"bytes": size, "sha256": hex digest}}}``
It is written into a temporary sibling folder, flushed, checksummed from the bytes on disk, then
renamed into place, so a crash at any moment leaves the previous checkpoints intact. A checkpoint is
*intact* when its manifest parses and every file it lists has the recorded size and sha256;
resuming takes the newest intact one (:func:`resume_checkpoint`). Other checkpoints are pruned only
after a new one was written completely, and never the new one, so ``keep`` never deletes the last
intact checkpoint.

Check a run's checkpoints from the shell::

    python -m crossmae.checkpoint verify runs/x     # each checkpoint: intact, or which file is damaged and how
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint can't be written, or no intact checkpoint can be read; the message names the file and why."""


@dataclass
class CheckpointCheck:
    """The verdict on one checkpoint folder.

    Attributes:
        path: the checkpoint folder.
        step: its step (from the folder name).
        problem: None when intact; else which file is damaged and how.
        bytes: total size of its files on disk.
    """

    path: Path
    step: int
    problem: str | None
    bytes: int

    @property
    def intact(self) -> bool:
        return self.problem is None


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, newest first (temporary folders of unfinished writes excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def verify_checkpoint(path: Path) -> CheckpointCheck:
    """Check a checkpoint folder against its manifest: every file present, of the recorded size and sha256."""
    path = Path(path)
    step = int(path.name[len(PREFIX):]) if path.name[len(PREFIX):].isdigit() else -1
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0

    def damaged(problem: str) -> CheckpointCheck:
        return CheckpointCheck(path, step, problem, size)

    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return damaged(f"{MANIFEST_FILE} is missing (the write did not finish, or the folder was copied in part)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return damaged(f"{MANIFEST_FILE} can't be read ({type(exc).__name__}: {exc})")
    for required in (MODEL_FILE, STATE_FILE):
        if required not in expected:
            return damaged(f"{MANIFEST_FILE} does not list {required}")
    for name, (n_bytes, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return damaged(f"{name} is missing")
        actual = file.stat().st_size
        if actual != n_bytes:
            return damaged(f"{name} is {actual} bytes, the manifest says {n_bytes} (truncated or overwritten)")
        if sha256_of(file) != digest:
            return damaged(f"{name} does not match its sha256 checksum (the bytes changed on disk)")
    return CheckpointCheck(path, step, None, size)


def check_run(run_dir: Path) -> list[CheckpointCheck]:
    """The verdict on each of a run's checkpoints, newest first."""
    return [verify_checkpoint(p) for p in checkpoint_folders(run_dir)]


def resume_checkpoint(run_dir: Path) -> tuple[Path, list[CheckpointCheck]]:
    """(the newest intact checkpoint, the damaged checkpoints newer than it).

    Raises:
        FileNotFoundError: the run has no checkpoint.
        CheckpointError: none of its checkpoints is intact (the message lists each one and why).
    """
    root = Path(run_dir) / "checkpoints"
    damaged = []
    for path in checkpoint_folders(run_dir):
        check = verify_checkpoint(path)
        if check.intact:
            return path, damaged
        damaged.append(check)
    if not damaged:
        raise FileNotFoundError(f"no checkpoint in {str(root)!r}")
    raise CheckpointError(f"no intact checkpoint in {str(root)!r}: "
                          + "; ".join(f"{c.path.name}: {c.problem}" for c in damaged))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run, or None."""
    try:
        return resume_checkpoint(run_dir)[0]
    except (FileNotFoundError, CheckpointError):
        return None


def _write_files(folder: Path, model_state: dict, state: dict) -> None:
    """Write the weights, the state and the manifest (checksums of the bytes on disk) into ``folder``."""
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(folder / MODEL_FILE))
    torch.save(state, folder / STATE_FILE)
    files = {}
    for name in (MODEL_FILE, STATE_FILE):
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())
        files[name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
    with open(folder / MANIFEST_FILE, "w") as fh:
        json.dump({"step": int(state.get("step", -1)), "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, step: int, model_state: dict, state: dict, keep: int = 2) -> Path:
    """Write ``step``'s checkpoint atomically with its manifest, then keep the ``keep`` newest.

    Raises:
        ValueError: ``keep`` < 1.
        CheckpointError: the checkpoint could not be written (no space, no permission ...); the
            message says where and why. Nothing of the failed write is left and no earlier
            checkpoint is touched.
    """
    if keep < 1:
        raise ValueError(f"keep (train.keep_checkpoints) must be at least 1, got {keep}")
    root = Path(run_dir) / "checkpoints"
    name = f"{PREFIX}{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    replaced = root / f".{name}.replaced-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{PREFIX}*"):  # left by a write that was killed; one writer per run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, model_state, state)
        if final.exists():  # the same step written again (e.g. a periodic step that is also the last)
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced.exists() and not final.exists():
            os.replace(replaced, final)
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        raise CheckpointError(
            f"could not write the checkpoint of step {step} into {str(root)!r}: {reason}{where}; "
            "the earlier checkpoints are untouched"
        ) from exc
    shutil.rmtree(replaced, ignore_errors=True)
    others = [p for p in checkpoint_folders(run_dir) if p != final]  # newest first
    for old in others[keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict, dict]:
    """(model weights, training state) of a checkpoint folder; raises FileNotFoundError naming what is missing."""
    path = Path(path)
    for f in (MODEL_FILE, STATE_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {f}")
    weights = load_file(str(path / MODEL_FILE), device=str(map_location))
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    return weights, state


def main(argv: list[str] | None = None) -> int:
    """``verify RUN``: print each checkpoint's state; exit 0 when all are intact, 1 when one is damaged, 2 when the
    run has none."""
    parser = argparse.ArgumentParser(prog="python -m crossmae.checkpoint", description="Check a run's checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify every checkpoint of a run against its manifest")
    verify.add_argument("run", help="the run folder (holding checkpoints/)")
    args = parser.parse_args(argv)
    checks = check_run(Path(args.run))
    if not checks:
        print(f"error: no checkpoint in {str(Path(args.run) / 'checkpoints')!r}", file=sys.stderr)
        return 2
    for c in checks:
        state = "intact " if c.intact else "DAMAGED"
        print(f"{c.path.name}  {state}  {c.bytes / 1e6:8.2f} MB" + ("" if c.intact else f"  {c.problem}"))
    newest = next((c for c in checks if c.intact), None)
    print(f"--resume would continue from {newest.path.name}" if newest else "--resume would stop: no intact checkpoint")
    return 0 if all(c.intact for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

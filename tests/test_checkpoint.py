"""Checkpoints are verified: a damaged newest one is named and skipped, a failed write stops the run and keeps
the earlier ones, pruning keeps the newest intact one, and changed data files are reported on resume."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_train import read_metrics, run_train, tiny_config

import crossmae.checkpoint as checkpoint_module
from crossmae.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    check_run,
    load_checkpoint,
    resume_checkpoint,
    sha256_of,
    verify_checkpoint,
)
from crossmae.engine import Trainer, TrainingStopped, data_changes

ROOT = Path(__file__).resolve().parents[1]
CAMELS = ROOT.parent / "shared" / "data" / "camels_us"


def finished_run(tmp_path: Path, steps: int = 8) -> Path:
    """A run of ``steps`` steps with checkpoints every 4 (the 2 newest kept), its metrics copied aside."""
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.val_every=0", steps=steps)).fit()
    shutil.copy(run / "metrics.csv", tmp_path / "uninterrupted.csv")
    return run


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, problem", [
    (truncate, MODEL_FILE, "bytes, the manifest says"),
    (flip_a_bit, STATE_FILE, "does not match its sha256 checksum"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(
        tmp_path, caplog, damage, file, problem):
    run = finished_run(tmp_path)
    newest = run / "checkpoints" / "step_00000008"
    damage(newest / file)
    check = verify_checkpoint(newest)
    assert not check.intact and file in check.problem and problem in check.problem

    with caplog.at_level(logging.WARNING, logger="crossmae.engine"):
        trainer = Trainer(tiny_config(run, "train.val_every=0", steps=8), resume=True)
    assert trainer.step == 4
    assert f"step_00000008 is damaged: {file}" in caplog.text
    assert "resuming from step_00000004, the newest intact checkpoint" in caplog.text
    trainer.fit()
    a, b = read_metrics(tmp_path / "uninterrupted.csv"), read_metrics(run / "metrics.csv")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 9)]
    for ra, rb in zip(a, b):
        for col in ("loss", "lr", "grad_norm"):
            assert ra[col] == rb[col], f"step {ra['step']} {col}: {ra[col]} vs {rb[col]}"
    assert all(c.intact for c in check_run(run))  # step 8 was written anew


def test_no_intact_checkpoint_stops_resume_with_every_reason(tmp_path):
    run = finished_run(tmp_path)
    truncate(run / "checkpoints" / "step_00000008" / MODEL_FILE)
    (run / "checkpoints" / "step_00000004" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError) as info:
        resume_checkpoint(run)
    message = str(info.value)
    assert "no intact checkpoint" in message and "step_00000008: model.safetensors is" in message
    assert "step_00000004: manifest.json is missing" in message

    result = run_train(["--resume", "--out-dir", str(run)])
    assert result.returncode == 2 and "no intact checkpoint" in result.stderr, result.stderr[-2000:]


def test_verify_lists_each_checkpoint_and_its_state(tmp_path, capsys):
    run = finished_run(tmp_path)
    assert checkpoint_module.main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_00000008  intact" in out and "step_00000004  intact" in out and "from step_00000008" in out

    flip_a_bit(run / "checkpoints" / "step_00000008" / MODEL_FILE)
    assert checkpoint_module.main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step_00000008  DAMAGED" in out and "model.safetensors does not match its sha256" in out
    assert "--resume would continue from step_00000004" in out
    assert checkpoint_module.main(["verify", str(tmp_path / "nothing")]) == 2


def snapshot(run: Path) -> dict[str, str]:
    """Every file under the run's checkpoints folder and its sha256."""
    root = run / "checkpoints"
    return {str(p.relative_to(root)): sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failing, error", [
    ("save_file", OSError(errno.ENOSPC, "No space left on device")),
    ("torch.save", PermissionError(errno.EACCES, "Permission denied")),
])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_earlier_ones(
        tmp_path, monkeypatch, failing, error):
    """The run folder turning read-only or full is simulated by making the writer raise the OSError the kernel
    would give (the tests run as root, where permission bits do not stop a write)."""
    config = tiny_config(tmp_path, "train.val_every=0", steps=12)
    trainer = Trainer(config)
    real_save_file, real_torch_save = checkpoint_module.save_file, checkpoint_module.torch.save
    before = {}

    def fail_after_the_first(real):
        def write(obj, path, *args, **kwargs):
            if not before:
                return real(obj, path, *args, **kwargs)
            Path(path).write_bytes(b"partial")  # a write that got part-way
            raise error
        return write

    def remember_and_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        before.update(snapshot(tmp_path))
        return path

    real_save = checkpoint_module.save_checkpoint
    monkeypatch.setattr("crossmae.engine.save_checkpoint", remember_and_save)
    if failing == "save_file":
        monkeypatch.setattr(checkpoint_module, "save_file", fail_after_the_first(real_save_file))
    else:
        monkeypatch.setattr(checkpoint_module.torch, "save", fail_after_the_first(real_torch_save))
    with pytest.raises(TrainingStopped) as info:
        trainer.fit()
    message = str(info.value)
    assert "could not write the checkpoint of step 8" in message and error.strerror in message
    assert "the earlier checkpoints are untouched" in message and "Stopping at step 8" in message
    assert snapshot(tmp_path) == before  # step 4 intact and unchanged, nothing of the failed write left
    assert [c.step for c in check_run(tmp_path)] == [4] and check_run(tmp_path)[0].intact
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []


@pytest.mark.skipif(bool(AS_NOBODY) and shutil.which("setpriv") is None,
                    reason="as root, permission bits do not stop a write, and setpriv is not there to drop root")
def test_a_read_only_checkpoints_folder_stops_the_run_with_a_clear_message():
    """A real read-only folder: train.py runs as an unprivileged user (root ignores permission bits)."""
    import subprocess
    import sys
    import tempfile

    from test_train import TINY

    work = Path(tempfile.mkdtemp(prefix="crossmae_readonly_"))
    try:
        work.chmod(0o777)
        run = work / "run"
        env = {**os.environ, "HOME": str(work), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        cmd = [*AS_NOBODY, sys.executable, str(ROOT / "train.py"), "--fused", *[f"--{o}" for o in TINY],
               "--train.val_every=0", "--out-dir", str(run)]
        first = subprocess.run([*cmd, "--max-steps", "8"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
        assert first.returncode == 0, first.stderr[-2000:]
        before = snapshot(run)
        (run / "checkpoints").chmod(0o555)
        resumed = subprocess.run([*AS_NOBODY, sys.executable, str(ROOT / "train.py"), "--resume", "--out-dir",
                                  str(run), "--max-steps", "12"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 3, resumed.stderr[-2000:]
        assert "could not write the checkpoint of step 12" in resumed.stderr
        assert "Permission denied" in resumed.stderr and "the earlier checkpoints are untouched" in resumed.stderr
        assert snapshot(run) == before and all(c.intact for c in check_run(run))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_pruning_keeps_the_newest_intact_checkpoint(tmp_path):
    """keep_checkpoints=1 after resuming past a damaged newer checkpoint: the new one is kept, intact."""
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.val_every=0", "train.ckpt_every=2", steps=6)).fit()
    flip_a_bit(run / "checkpoints" / "step_00000006" / MODEL_FILE)
    config = tiny_config(run, "train.val_every=0", "train.ckpt_every=4", "train.keep_checkpoints=1", steps=5)
    trainer = Trainer(config, resume=True)
    assert trainer.step == 4
    trainer.fit()
    checks = check_run(run)
    assert [c.step for c in checks] == [5] and checks[0].intact


def test_data_changes_name_each_file_and_grid():
    before = {"files": {"a.nc": {"bytes": 10, "mtime_ns": 1}, "b.txt": {"bytes": 5, "mtime_ns": 1},
                        "c.txt": {"bytes": 5, "mtime_ns": 1}}, "grids": {"pre": [1, 20, 30]}}
    now = {"files": {"a.nc": {"bytes": 12, "mtime_ns": 2}, "b.txt": {"bytes": 5, "mtime_ns": 3},
                     "d.txt": {"bytes": 1, "mtime_ns": 1}}, "grids": {"pre": [1, 21, 30]}}
    assert data_changes(before, now) == [
        "a.nc (size 10 -> 12 bytes)", "b.txt (modified since the run started)", "c.txt (no longer found)",
        "d.txt (not read when the run started)", "grid 'pre' (shape [C, H, W] [1, 20, 30] -> [1, 21, 30])",
    ]
    assert data_changes(before, before) == []


@pytest.mark.skipif(not CAMELS.is_dir(), reason="the shared CAMELS-US data is not at ../shared/data")
def test_resuming_on_changed_data_files_warns_with_their_names_and_keeps_the_runs_statistics(tmp_path, caplog):
    from crossmae.config import resolve_config
    from crossmae.data.loader import build_dataset

    data = tmp_path / "camels"
    shutil.copytree(CAMELS, data)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    small = ["data.steps=16", "data.stride=8", "data.batch_size=4", "model.enc_dim=32", "model.enc_depth=1",
             "model.enc_heads=2", "model.dec_dim=32", "model.dec_depth=1", "model.dec_heads=2",
             f"data.files.root={data}", "train.val_every=0", "train.ckpt_every=2", f"train.out_dir={tmp_path / 'run'}"]
    config = resolve_config(None, str(ROOT / "configs" / "camels_us.yaml"), [*small, "train.max_steps=2"])
    config.train.fused = True
    first = Trainer(config)
    first.fit()
    stats = json.loads(json.dumps(first.train_set.norm_stats))

    flow = next((data / "usgs_streamflow").glob("*_streamflow_qc.txt"))
    lines = flow.read_text().splitlines()
    parts = lines[0].split()
    parts[4] = f"{float(parts[4]) * 50:.2f}"  # 2000-01-01, in the training period: far larger now
    flow.write_text("\n".join([" ".join(parts), *lines[1:]]) + "\n")
    touched = data / "camels_attributes_v2.0" / "camels_clim.txt"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))

    config = resolve_config(None, str(ROOT / "configs" / "camels_us.yaml"), [*small, "train.max_steps=3"])
    config.train.fused = True
    with caplog.at_level(logging.WARNING, logger="crossmae.engine"):
        resumed = Trainer(config, resume=True)
    assert "the data changed since the run started" in caplog.text
    assert f"{flow} (size" in caplog.text and f"{touched} (modified since the run started)" in caplog.text
    assert "run's normalisation statistics" in caplog.text
    assert resumed.train_set.norm_stats == stats
    assert build_dataset(config.data, "train").norm_stats != stats  # the changed file would change them
    _, state = load_checkpoint(resume_checkpoint(tmp_path / "run")[0])
    assert json.loads(state["norm_stats"]) == stats

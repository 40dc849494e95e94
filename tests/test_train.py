"""train.py and the engine: a run trains, checkpoints, resumes exactly, survives bad steps, and
data parallelism matches one process."""

import csv
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossmae.checkpoint import latest_checkpoint, load_checkpoint
from crossmae.config import resolve_config
from crossmae.engine import Trainer, TrainingStopped
from crossmae.model import MultimodalCrossMAE

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.synthetic.num_basins=3", "data.synthetic.record_days=160", "data.synthetic.grid_size=12",
    "data.synthetic.basin_patches=[4, 9]", "data.patch_size=4", "data.steps=8", "data.stride=4",
    "data.batch_size=4", "model.enc_dim=32", "model.enc_depth=2", "model.enc_heads=2", "model.dec_dim=32",
    "model.dec_depth=1", "model.dec_heads=2", "train.warmup_steps=2", "train.val_every=4", "train.val_batches=2",
    "train.ckpt_every=4", "train.lr=3e-3",
]


def tiny_config(tmp_path, *extra, steps=8):
    config = resolve_config(None, None, [*TINY, f"train.max_steps={steps}", f"train.out_dir={tmp_path}", *extra])
    config.train.fused = True
    return config


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_train(args, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def test_training_writes_metrics_config_checkpoints_and_the_loss_falls(tmp_path):
    config = tiny_config(tmp_path, "train.val_every=8", steps=24)
    trainer = Trainer(config)
    last = trainer.fit()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    names = trainer.model.names
    for col in ["loss", "lr", "tokens_per_s", *[f"loss_{n}" for n in names]]:
        assert all(math.isfinite(float(r[col])) for r in rows), col
    early = sum(float(r["loss"]) for r in rows[:4]) / 4
    late = sum(float(r["loss"]) for r in rows[-4:]) / 4
    assert late < early, f"loss did not fall: {early:.3f} -> {late:.3f}"
    val = read_metrics(tmp_path / "val_metrics.csv")
    assert [int(r["step"]) for r in val] == [8, 16, 24]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "norm_stats.json").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000024"
    weights, state = load_checkpoint(ckpt)
    assert state["step"] == 24 and set(weights) == set(trainer.model.state_dict())
    assert "val" in last


def test_resume_after_sigkill_logs_the_same_losses(tmp_path):
    """A run killed mid-way and resumed logs the same losses, step for step, as an uninterrupted run."""
    common = ["--fused", "--max-steps", "12", *[f"--{o}" for o in TINY]]
    whole = tmp_path / "whole"
    done = run_train([*common, "--out-dir", str(whole)])
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out-dir", str(killed)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:  # header + 6 steps
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = len(read_metrics(metrics))
    assert 6 <= steps_before < 12, f"the run was not killed mid-way ({steps_before} steps logged)"
    assert latest_checkpoint(killed) is not None

    resumed = run_train(["--resume", "--out-dir", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_metrics(whole / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(s) for s in range(1, 13)]
    for ra, rb in zip(a, b):
        for col in ra:
            if col.startswith("loss") or col in ("lr", "grad_norm"):
                assert ra[col] == rb[col], f"step {ra['step']} {col}: {ra[col]} vs {rb[col]}"


def test_non_finite_steps_are_skipped_then_the_run_stops_keeping_good_weights(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "train.max_nonfinite_steps=3", "train.ckpt_every=2", "train.val_every=0", steps=20)
    real_forward = MultimodalCrossMAE.forward
    calls = {"n": 0}

    def flaky_forward(self, batch, normalizers=None):
        out = real_forward(self, batch, normalizers)
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 6:  # one bad step, later a run of bad steps
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(MultimodalCrossMAE, "forward", flaky_forward)
    trainer = Trainer(config)
    with pytest.raises(TrainingStopped, match="non-finite for 3 steps in a row"):
        trainer.fit()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 0, 0, 1, 1, 1]
    weights, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 8
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(weights[name]).all() and torch.equal(weights[name], value)


def test_bad_config_and_missing_file_stop_before_any_work(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    out = tmp_path / "never"
    for args, message in [
        (["--model.enc_dim=abc"], "model.enc_dim must be an integer"),
        (["--model.no_such_key=1"], "unknown config key 'model.no_such_key'"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml' does not exist"),
        (["--preset", "huge"], "preset must be one of"),
        (["--mask.kept_mask_ratio=0"], "mask.kept_mask_ratio is a fraction of all valid tokens"),
        (["--resume"], "--resume needs --out-dir"),
    ]:
        code = train.main(args + (["--out-dir", str(out)] if args != ["--resume"] else []))
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err, err
        assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path):
    Trainer(tiny_config(tmp_path, steps=2)).fit()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(tiny_config(tmp_path, steps=2))


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """DDP (gloo, 2 CPU processes, batch 2 each) gives the loss curve of 1 process with batch 4."""
    common = ["--fused", "--max-steps", "5", *[f"--{o}" for o in TINY], "--train.val_every=0"]
    one = run_train([*common, "--out-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(ROOT / "train.py"), *common, "--data.batch_size=2", "--out-dir", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one" / "metrics.csv"), read_metrics(tmp_path / "two" / "metrics.csv")
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        for col in ra:
            if col.startswith("loss"):
                x, y = float(ra[col]), float(rb[col])
                assert abs(x - y) <= 1e-5 * max(abs(x), 1e-6), f"step {ra['step']} {col}: {x} vs {y}"


def test_a_modality_with_no_value_to_score_logs_nan_and_stays_out_of_the_total(tmp_path):
    """A batch can hold no hidden value of a modality (a site set on days without gauges): its per-step loss is
    NaN, not a misleading 0.0, and the total is the weighted sum of the scored modalities alone. The forward is
    made to report no counted value for one series modality."""
    config = tiny_config(tmp_path, "train.val_every=0", steps=3)
    trainer = Trainer(config)
    series = next(n for n in trainer.model.names if trainer.model.spec[n].kind == "series")
    forward = trainer.forward_model

    def without_series(batch):
        out = forward(batch)
        out.counts[series] = torch.zeros_like(out.counts[series])
        out.sums[series] = out.sums[series] * 0.0
        return out

    trainer.forward_model = without_series
    trainer.fit()
    weights = config.model.loss_weights
    scored = [n for n in trainer.model.names if n != series]
    rows = read_metrics(tmp_path / "metrics.csv")
    assert len(rows) == 3
    for row in rows:
        assert math.isnan(float(row[f"loss_{series}"]))
        assert all(math.isfinite(float(row[f"loss_{n}"])) for n in scored)
        total = sum(weights.get(n, 1.0) * float(row[f"loss_{n}"]) for n in scored)
        assert float(row["loss"]) == pytest.approx(total, rel=1e-6)

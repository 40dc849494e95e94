"""bench/memory_experiment.py end to end at a tiny size, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` is not installed: import it from the repo

from bench import memory_experiment  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "nile"], "unknown data set 'nile'"),
    (["--seeds", "a"], "--seeds: expected comma-separated integers"),
    (["--splits", "holdout"], "unknown split 'holdout'"),
    (["--lr=1"], "unrecognised argument '--lr=1'"),
    (["--variants", "joint+shared"], "unknown part 'shared' of 'joint+shared'"),
    (["--eval-modes", "frame"], "--eval-modes: unknown mode 'frame'"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        memory_experiment.parse_args(argv)
    assert message in capsys.readouterr().err


def test_variant_names_map_to_settings():
    assert memory_experiment.variant_overrides("own+unified+fusion+drop=pre") == [
        "--model.memory=own", "--mask.mode=unified", "--model.fusion_depth=1", "--model.memory_drop=[pre]"]


def test_variant_runs_are_trained_scored_and_written(tmp_path):
    out = tmp_path / "result"
    cmd = [sys.executable, "bench/memory_experiment.py", "--datasets", "synthetic", "--max-steps", "2",
           "--runs", str(tmp_path / "runs"), "--out", str(out), "--variants", "joint,own+unified+fusion",
           "--eval-modes", "run,free", "--seeds", "0,1",
           "--train.val_every=2", "--train.val_batches=1", "--data.batch_size=2", "--train.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    # --eval-modes run,free: the joint run's own mode is free (scored once); the unified run on its own masks, then free
    per_seed = [("joint", "free"), ("own+unified+fusion", "unified"), ("own+unified+fusion", "free")]
    assert [(r["seed"], r["variant"], r["eval_mask_mode"]) for r in rows] == [
        (seed, *e) for seed in (0, 1) for e in per_seed]
    for row in rows:
        assert row["step"] == 2 and row["flow"] == "streamflow"
        assert row["flow_masked_mse"] > 0 and set(row["masked_mse"]) >= {"streamflow", "precip"}
    assert "--max-steps 2" in result["metadata"]["command"]
    md = out.with_suffix(".md").read_text()
    assert "| synthetic | 0 | val | free | 2 | joint |" in md
    assert "| synthetic | 1 | val | unified | 2 | own+unified+fusion |" in md
    assert "| synthetic | val | free | joint | 2 |" in md  # the summary over the two seeds
    # --reuse: a finished run is scored again, not trained again
    again = tmp_path / "again"
    cmd = [*cmd[:cmd.index("--out") + 1], str(again), "--variants", "joint", "--seeds", "0", "--eval-modes", "run",
           "--reuse", *cmd[cmd.index("--seeds") + 2:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reusing the finished run" in proc.stdout and "train.py" not in proc.stdout
    row = json.loads(again.with_suffix(".json").read_text())["rows"][0]
    assert row["train_s"] is None and row["flow_masked_mse"] == rows[0]["flow_masked_mse"]

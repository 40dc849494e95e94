"""Command lines: ``--resume`` takes the run's own flags again and refuses conflicting ones; every console
script of pyproject.toml names an importable ``main``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from crossmae.checkpoint import latest_checkpoint, load_checkpoint
from crossmae.train_cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--data.synthetic.num_basins=2", "--data.synthetic.record_days=120", "--data.synthetic.grid_size=8",
    "--data.synthetic.basin_patches=[2, 4]", "--data.patch_size=4", "--data.steps=8", "--data.stride=4",
    "--data.batch_size=2", "--model.enc_dim=16", "--model.enc_depth=1", "--model.enc_heads=2",
    "--model.dec_dim=16", "--model.dec_depth=1", "--model.dec_heads=2", "--train.warmup_steps=1",
    "--train.val_every=0", "--train.ckpt_every=2",
]


def test_resume_accepts_the_same_command_and_names_both_values_of_a_conflict(tmp_path, capsys):
    run = tmp_path / "run"
    command = ["--fused", "--max-steps", "2", "--seed", "3", *TINY, "--out-dir", str(run)]
    assert train_main(command) == 0
    assert train_main([*command, "--resume", "--max-steps", "4"]) == 0
    _, state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 4
    capsys.readouterr()

    assert train_main([*command, "--resume", "--model.enc_dim=32"]) == 2
    err = capsys.readouterr().err
    assert "model.enc_dim: the run has 16, the command gives 32" in err, err
    assert train_main([*command[1:], "--resume", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "train.fused: the run has True, the command gives False" in err, err
    assert "train.seed: the run has 3, the command gives 5" in err, err
    assert train_main(["--resume", "--out-dir", str(run), "--max-steps", "5"]) == 0



def test_console_scripts_name_importable_mains():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"crossmae-train", "crossmae-eval", "crossmae-fill", "crossmae-embed"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target

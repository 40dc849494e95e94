"""``--resume`` as users type it: part of the command again (only the keys given are compared), from another
working directory or a moved run folder, with the data folder moved (named, then ``--data.files.root``), and
a changed data source named item by item."""

from __future__ import annotations

import yaml

from crossmae.checkpoint import latest_checkpoint, load_checkpoint
from crossmae.engine import load_run_config
from crossmae.train_cli import main as train_main
from tests.gap_data import make_data
from tests.test_cli import TINY


def step_of(run) -> int:
    _, state = load_checkpoint(latest_checkpoint(run))
    return int(state["step"])


def test_part_of_the_command_again_is_compared_key_by_key(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--fused", "--max-steps", "2", "--seed", "3", *TINY, "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert train_main(["--resume", "--out-dir", str(run), "--fused", "--seed", "3", "--max-steps", "3",
                       "--model.enc_dim=16"]) == 0
    assert step_of(run) == 3
    assert train_main(["--resume", "--out-dir", str(run), "--fused", "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "conflicts with it on train.seed: the run has 3, the command gives 4 (drop" in err, err  # that key alone
    assert train_main(["--resume", "--out-dir", str(run), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "on train.fused: the run has True, the command gives False (the flag --fused) (drop" in err, err
    assert train_main(["--resume", "--out-dir", str(run), "--preset", "cpu", "--fused"]) == 2
    assert "on preset: the run has 'default', the command gives 'cpu' (drop" in capsys.readouterr().err


def test_a_moved_run_folder_resumes_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--fused", "--max-steps", "2", *TINY, "--out-dir", "run"]) == 0
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train_main(["--resume", "--out-dir", str(tmp_path / "moved"), "--max-steps", "4"]) == 0
    assert step_of(tmp_path / "moved") == 4
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere" / "moved").exists()


def test_a_moved_data_folder_is_named_and_data_files_root_continues(tmp_path, capsys):
    config = make_data(tmp_path / "data", basins=("a",))
    run = tmp_path / "run"
    command = ["--fused", "--config", str(config), "--max-steps", "2", "--train.val_every=0",
               "--train.ckpt_every=2", "--out-dir", str(run)]
    assert train_main(command) == 0
    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    assert train_main(["--resume", "--out-dir", str(run), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f"data.files.root {str(tmp_path / 'data')!r} of the run does not exist (moved?)" in err, err
    assert "--data.files.root=" in err
    assert train_main(["--resume", "--out-dir", str(run), "--fused", "--max-steps", "3",
                       f"--data.files.root={tmp_path / 'moved'}"]) == 0
    assert step_of(run) == 3
    assert load_run_config(run).data.files.root == str(tmp_path / "moved")
    assert train_main(["--resume", "--out-dir", str(run), "--max-steps", "4"]) == 0  # the new folder is kept
    assert step_of(run) == 4


def test_a_changed_data_source_is_named_item_by_item(tmp_path, capsys):
    config = make_data(tmp_path / "data", basins=("a",))
    run = tmp_path / "run"
    assert train_main(["--fused", "--config", str(config), "--max-steps", "1", "--train.val_every=0",
                       "--out-dir", str(run)]) == 0
    other = yaml.safe_load(config.read_text())
    other["data"]["files"]["series"][1]["columns"] = ["flow"]
    changed = tmp_path / "data" / "changed.yaml"
    changed.write_text(yaml.safe_dump(other))
    capsys.readouterr()
    assert train_main(["--resume", "--fused", "--config", str(changed), "--out-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "data.files.series[1].columns: the run has ['precip'], the command gives ['flow'] (drop" in err, err


def test_resuming_a_run_already_at_max_steps_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--fused", "--max-steps", "2", *TINY, "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert train_main(["--resume", "--out-dir", str(run), "--max-steps", "1"]) == 0
    assert "the run is at step 2, train.max_steps is 1: nothing to train" in capsys.readouterr().out
    assert step_of(run) == 2

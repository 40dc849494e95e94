"""bench/decoder_speed.py end to end at a tiny size: rows, JSON schema, CSV, plot, sweep, compare."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import decoder_speed
from crossmae.ops import BACKENDS

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--preset", "cpu", "--batch", "2", "--steps", "1", "--reps", "2", "--warmup", "1", "--peak-size", "64",
        "--threads", "1"]
SCHEMA = {  # the fields the issue names, and their types
    "variant": str, "preset": str, "device": str, "ms_p50": float, "ms_p20": float, "ms_p80": float,
    "peak_mb": float, "attn_tflops": float, "speedup_vs_self_attn": float, "speedup_vs_loop": float,
    "torch": str, "triton": str, "python": str, "git_sha": str,
}


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_decoder_speed_cpu_preset_end_to_end(tmp_path, capsys):
    path = tmp_path / "decoder.json"
    variants = "self_attn,loop,padded,packed"
    assert decoder_speed.main([*TINY, "--variants", variants, "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    meta, rows = data["metadata"], data["rows"]
    for key in ("command", "date", "load_avg_1m", "torch_threads", "git_sha", "matmul_peak", "key_fields"):
        assert key in meta, key
    assert meta["command"].startswith("python bench/decoder_speed.py --preset cpu")
    assert meta["metric"] == "ms_p50" and meta["key_fields"] == list(decoder_speed.KEY_FIELDS)

    names = [r["variant"] for r in rows]
    assert names == ["self_attn", "loop", "padded", *(f"packed/{b}" for b in decoder_speed.packed_backends())]
    assert "packed/cpu" in names and "packed/triton" in names  # listed whether or not they run here
    for row in rows:
        assert set(decoder_speed.ROW_FIELDS) <= set(row), set(decoder_speed.ROW_FIELDS) - set(row)
        assert row["preset"] == "cpu" and row["device"] == "cpu" and row["B"] == 2 and row["dtype"] == "fp32"
        if row["status"] != "ok":
            assert row["status"] == "skipped" and row["reason"], row
            continue
        for key, kind in SCHEMA.items():
            assert isinstance(row[key], kind), (row["variant"], key, row[key])
        assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        assert row["reps"] == 2 and row["attn_gflop"] > 0 and row["attn_tflops"] > 0
    ok = {r["variant"]: r for r in rows if r["status"] == "ok"}
    assert {"self_attn", "loop", "padded", "packed/sdpa_padded"} <= ok.keys()
    assert ok["self_attn"]["speedup_vs_self_attn"] == 1.0 and ok["loop"]["speedup_vs_loop"] == 1.0
    # the standard decoder attends over memory + masked tokens, CrossMAE's queries to the memory only
    assert ok["self_attn"]["attn_gflop"] > ok["loop"]["attn_gflop"]
    for name in ("padded", "packed/sdpa_padded"):
        assert ok[name]["loss_rel_err"] < 1e-4  # every CrossMAE layout computes the loop's loss
    triton = next(r for r in rows if r["variant"] == "packed/triton")
    assert triton["status"] == "skipped"
    if "cpu" not in BACKENDS:
        assert "not registered" in next(r for r in rows if r["variant"] == "packed/cpu")["reason"]

    csv_lines = path.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:5] == list(decoder_speed.KEY_FIELDS) and len(csv_lines) == len(rows) + 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert path.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "vs self_attn" in printed and "not run:" in printed

    # comparing the run with itself: every timed row matches, nothing regressed
    assert decoder_speed.compare(path, path, 0.05) == 0
    assert f"{len(ok)} rows compared, 0 slower" in capsys.readouterr().out


def test_decoder_speed_batch_sweep(tmp_path):
    path = tmp_path / "sweep.json"
    args = [*TINY, "--sweep", "batch", "--batches", "1,2", "--sweep-backend", "sdpa_padded", "--no-plot"]
    assert decoder_speed.main([*args, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["variant"], r["B"]) for r in rows] == [
        (v, b) for b in (1, 2) for v in ("self_attn", "loop", "packed/sdpa_padded")
    ]
    assert all(r["status"] == "ok" and r["ms_per_sample"] > 0 for r in rows)
    growth = json.loads(path.read_text())["metadata"]["sweep_growth"]
    assert {g["variant"] for g in growth} == {"self_attn", "loop", "packed/sdpa_padded"}


def test_decoder_speed_runs_as_a_script_and_names_bad_flags(capsys):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "decoder_speed.py"), "--preset", "huge"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--preset" in result.stderr, result.stderr
    bad = ((["--variants", "packed/nope"], "--variants"), (["--batches", "1,2"], "--batches"),
           (["--reps", "0"], "--reps"), (["--sweep", "batch", "--sweep-backend", "x"], "--sweep-backend"))
    for flags, named in bad:
        with pytest.raises(SystemExit):
            decoder_speed.main(flags)
        assert named in capsys.readouterr().err, flags

"""The benchmark harness and the attention benchmark's command line, on tiny CPU shapes."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not installed: import it from the repo

from bench import harness  # noqa: E402
from bench.attention_speed import KEY_FIELDS, ROW_FIELDS, main  # noqa: E402

TINY = ["--preset", "cpu", "--batch", "2", "--steps", "1", "--reps", "2", "--warmup", "1", "--peak-size", "64"]


def test_attention_speed_writes_rows(tmp_path, capsys):
    stem = tmp_path / "speed"
    assert main([*TINY, "--backends", "math,sdpa_padded,loop,torch_varlen", "--out", str(stem)]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    meta, rows = data["metadata"], data["rows"]
    assert stem.with_suffix(".csv").read_text().splitlines()[0].split(",")[: len(KEY_FIELDS)] == list(KEY_FIELDS)
    for key in ("command", "date", "device", "device_name", "torch", "triton", "python", "git_sha", "matmul_peak"):
        assert key in meta, key
    assert meta["key_fields"] == list(KEY_FIELDS)
    assert meta["matmul_peak"]["dtype"] == "fp32" and meta["matmul_peak"]["tflops"] > 0

    assert len(rows) == 4 * 3
    for row in rows:
        assert set(ROW_FIELDS) <= set(row), set(ROW_FIELDS) - set(row)
        assert row["op"] == "varlen_attention" and row["preset"] == "cpu" and row["dtype"] == "fp32"
        assert (row["B"], row["total_q"], row["total_k"], row["H"], row["D"]) == (2, 140, 48, 8, 16)
        assert row["device"] == "cpu" and row["git_sha"]
    ran = [r for r in rows if r["backend"] != "torch_varlen"]
    for row in ran:
        assert row["status"] == "ok", row
        assert row["reps"] == 2
        assert 0 < row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["tflops"] > 0 and row["peak_frac"] > 0 and row["gflop"] > 0
        assert row["vs_loop"] > 0
    gflop = {r["pass"]: r["gflop"] for r in ran if r["backend"] == "math"}
    assert gflop["bwd"] == pytest.approx(2.5 * gflop["fwd"]) and gflop["fwd+bwd"] == pytest.approx(3.5 * gflop["fwd"])
    assert all(r["vs_loop"] == 1.0 for r in ran if r["backend"] == "loop")
    for row in rows:
        if row["backend"] == "torch_varlen":
            assert row["status"] == "skipped" and "CUDA" in row["reason"]
    printed = capsys.readouterr().out
    assert "not run:" in printed and "torch_varlen" in printed


def test_attention_speed_errors_name_the_flag(capsys):
    for flags, named in ((["--backends", "nope"], "--backends"), (["--preset", "huge"], "--preset"),
                         (["--passes", "sideways"], "--passes"), (["--dtype", "int8"], "--dtype"),
                         (["--reps", "0"], "--reps")):
        with pytest.raises(SystemExit):
            main(flags)
        assert named in capsys.readouterr().err


def write(path, rows, key_fields=("op", "shape")):
    harness.write_results(rows, path, {"key_fields": list(key_fields), "git_sha": "abc"})
    return path.with_suffix(".json")


def test_compare_reports_every_matching_row_and_fails_past_threshold(tmp_path, capsys):
    old = write(tmp_path / "old", [
        {"op": "a", "shape": "s", "p50_ms": 10.0},
        {"op": "b", "shape": "s", "p50_ms": 10.0},
        {"op": "c", "shape": "s", "p50_ms": 10.0},
        {"op": "gone", "shape": "s", "p50_ms": 1.0},
    ])
    same = write(tmp_path / "same", [
        {"op": "a", "shape": "s", "p50_ms": 10.4},
        {"op": "b", "shape": "s", "p50_ms": 5.0},
        {"op": "c", "shape": "s", "p50_ms": None},  # skipped in the new run: not compared
    ])
    assert harness.compare(old, same, threshold=0.05) == 0
    out = capsys.readouterr().out
    assert "2 rows compared, 0 slower" in out and "only in old: op=gone" in out and "faster" in out

    slower = write(tmp_path / "slower", [{"op": "a", "shape": "s", "p50_ms": 11.0}])
    assert harness.compare(old, slower, threshold=0.05) == 1
    assert "1 rows compared, 1 slower" in capsys.readouterr().out
    assert harness.compare(old, slower, threshold=0.2) == 0


def test_measure_on_cpu_gives_ordered_quantiles():
    timing = harness.measure(lambda: sum(range(1000)), device="cpu", warmup=1, reps=7)
    assert timing.reps == 7
    assert 0 < timing.p20_ms <= timing.p50_ms <= timing.p80_ms
    assert timing.joules is None
    auto = harness.measure(lambda: None, device="cpu", warmup=1, min_time=0.01, max_reps=50)
    assert harness.MIN_REPS <= auto.reps <= 50


def test_peak_memory_on_cpu_counts_what_the_call_adds():
    if not harness.rss_peak_supported():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    peak = harness.measure_peak_memory(lambda: torch.ones(25_000_000), device="cpu")  # 100 MB written
    assert peak.method == "rss_hwm"
    assert 90 < peak.peak_mb < 200
    assert peak.peak_total_mb >= peak.peak_mb


def test_print_table_aligns_columns(capsys):
    harness.print_table([{"name": "x", "ms": 1.5}, {"name": "longer", "ms": 1234.0}], ["name", ("time", "ms")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "time"]
    assert len({len(line) for line in lines}) == 1  # numbers are right-aligned to the header's width

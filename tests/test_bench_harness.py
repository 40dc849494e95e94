"""The benchmark harness and the attention benchmark's command line, on tiny CPU shapes."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import harness
from bench.attention_speed import KEY_FIELDS, ROW_FIELDS, main
from crossmae.presets import PRESETS, attention_lengths

ROOT = Path(__file__).resolve().parents[1]

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
    lengths_q, lengths_k = attention_lengths(dataclasses.replace(PRESETS["cpu"], batch=2, steps=1))
    for row in rows:
        assert set(ROW_FIELDS) <= set(row), set(ROW_FIELDS) - set(row)
        assert row["op"] == "varlen_attention" and row["preset"] == "cpu" and row["dtype"] == "fp32"
        shape = (row["B"], row["total_q"], row["total_k"], row["H"], row["D"])
        assert shape == (2, sum(lengths_q), sum(lengths_k), 8, 16)
        assert row["device"] == "cpu" and row["git_sha"]
    ran = [r for r in rows if r["backend"] != "torch_varlen"]
    for row in ran:
        assert row["status"] == "ok", row
        assert row["reps"] == 2
        assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        assert row["tflops"] > 0 and row["peak_frac"] > 0 and row["gflop"] > 0
        assert row["speedup_vs_loop"] > 0
    gflop = {r["pass"]: r["gflop"] for r in ran if r["backend"] == "math"}
    assert gflop["bwd"] == pytest.approx(2.5 * gflop["fwd"]) and gflop["fwd+bwd"] == pytest.approx(3.5 * gflop["fwd"])
    assert all(r["speedup_vs_loop"] == 1.0 for r in ran if r["backend"] == "loop")
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
        {"op": "a", "shape": "s", "ms_p50": 10.0},
        {"op": "b", "shape": "s", "ms_p50": 10.0},
        {"op": "c", "shape": "s", "ms_p50": 10.0},
        {"op": "gone", "shape": "s", "ms_p50": 1.0},
    ])
    same = write(tmp_path / "same", [
        {"op": "a", "shape": "s", "ms_p50": 10.4},
        {"op": "b", "shape": "s", "ms_p50": 5.0},
        {"op": "c", "shape": "s", "ms_p50": None},  # skipped in the new run: not compared
    ])
    assert harness.compare(old, same, threshold=0.05) == 0
    out = capsys.readouterr().out
    assert "2 rows compared, 0 slower" in out and "only in old: op=gone" in out and "faster" in out

    slower = write(tmp_path / "slower", [{"op": "a", "shape": "s", "ms_p50": 11.0}])
    assert harness.compare(old, slower, threshold=0.05) == 1
    assert "1 rows compared, 1 slower" in capsys.readouterr().out
    assert harness.compare(old, slower, threshold=0.2) == 0


def test_measure_on_cpu_gives_ordered_quantiles():
    timing = harness.measure(lambda: sum(range(1000)), device="cpu", warmup=1, reps=7)
    assert timing.reps == 7
    assert 0 < timing.ms_p20 <= timing.ms_p50 <= timing.ms_p80
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


def test_measure_times_the_first_call_on_its_own():
    calls = []

    def fn():
        calls.append(None)
        if len(calls) == 1:  # a first call that compiles
            sum(range(200_000))

    timing = harness.measure(fn, device="cpu", warmup=2, reps=3)
    assert len(calls) == 2 + 3
    assert timing.first_call_ms > timing.ms_p80
    assert harness.Timing.merge([timing, timing]).first_call_ms == timing.first_call_ms
    assert timing.as_row()["first_call_ms"] == timing.first_call_ms


class FakeNvml:
    """An energy counter that gains 250 W of mJ with wall time, like NVML's on a busy GPU."""

    def __init__(self):
        self.start = harness.time.perf_counter()

    def energy_mj(self):
        return int((harness.time.perf_counter() - self.start) * 250_000)

    def sm_clock_mhz(self):
        return 1980


def test_energy_is_read_over_its_own_loop_of_back_to_back_calls(monkeypatch):
    assert harness.measure_energy(lambda: None, device="cpu") is None  # no NVML on a CPU
    monkeypatch.setattr(harness.Nvml, "open", classmethod(lambda cls, device: FakeNvml()))
    calls = []

    def fn():
        calls.append(None)
        harness.time.sleep(0.002)

    energy = harness.measure_energy(fn, device="cpu", seconds=0.1, call_ms=10.0)  # the estimate is 5x too long
    assert energy.seconds >= 0.1 and energy.calls == len(calls) >= 20
    assert energy.power_w == pytest.approx(250, rel=0.1)
    assert energy.joules == pytest.approx(250 * energy.seconds / energy.calls, rel=0.1)
    assert energy.sm_clock_mhz == 1980
    assert harness.measure_energy(fn, device="cpu", seconds=0) is None


def run_stub(rows):
    return SimpleNamespace(rows=rows, saved=0, save=lambda out: None)


def test_run_rounds_interleaves_rounds_and_pools_samples(tmp_path):
    rows = [{"name": "a", "status": "ok"}, {"name": "b", "status": "skipped"}, {"name": "c", "status": "ok"}]
    order = []

    def timer(row, ms):
        def time(first):
            order.append((row["name"], first))
            if row["name"] == "c" and not first:
                harness.record_error(row, RuntimeError("broke in round 2"), "c")
                return None
            return harness.Timing.from_samples([ms, ms + 1], first_call_ms=10 * ms)
        return time

    measurements = [harness.Measurement(row, timer(row, ms), row["name"]) for row, ms in zip(rows, (1.0, 2.0, 3.0))]
    derived = []
    harness.run_rounds(run_stub(rows), measurements, rounds=2, out=tmp_path / "x",
                       derive=lambda rs: derived.append(len(rs)))
    assert order == [("a", True), ("c", True), ("a", False), ("c", False)]
    assert rows[0]["reps"] == 4 and rows[0]["first_call_ms"] == 10.0 and rows[0]["ms_p50"] == pytest.approx(1.5)
    assert "ms_p50" not in rows[1]
    assert rows[2]["status"] == "error" and rows[2]["reps"] == 2  # keeps what round 1 measured
    assert derived == [3, 3, 3]


def test_add_speedups_divides_the_baseline_median_within_a_group():
    rows = [
        {"variant": "loop", "preset": "p", "ms_p50": 10.0},
        {"variant": "packed", "preset": "p", "ms_p50": 2.0},
        {"variant": "packed", "preset": "q", "ms_p50": 4.0},
        {"variant": "packed", "preset": "p", "ms_p50": None, "status": "skipped"},
    ]
    harness.add_speedups(rows, "variant", ["loop"], ["preset"])
    assert [r.get("speedup_vs_loop") for r in rows] == [1.0, 5.0, None, None]


@pytest.mark.parametrize("how", [["bench/train_speed.py"], ["-m", "bench.decoder_speed"]])
def test_benchmarks_run_as_a_file_and_as_a_module(how):
    result = subprocess.run([sys.executable, *how, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--energy-time" in result.stdout and "--rounds" in result.stdout


def test_environment_record_and_its_summary():
    env = harness.environment("cpu")
    for key in ("date", "host", "cpu_model", "cpu_count", "python", "torch", "triton", "git_sha", "git_dirty"):
        assert key in env, key
    line = harness.machine_summary(env)
    assert env["cpu_model"] in line and "no GPU" in line and env["torch"] in line
    assert harness.command_line("python x.py", ["--a", "b c"]) == "python x.py --a 'b c'"

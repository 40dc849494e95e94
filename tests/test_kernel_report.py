"""Static sm_90 checks of the Triton kernels: no GPU needed (method: bench/kernel_report.py).

Every kernel is compiled ahead of time for Hopper with Triton's compiler and the ptxas and
cuobjdump bundled with triton; a test fails when a configuration the autotuner may pick
(``prune_configs``) spills registers, overflows shared memory, misses HGMMA (warpgroup
tensor-core MMA) where Triton's MMAv3 rule allows it, or has a tile with fewer rows than its
warps cover (warpgroups repeating the same rows).

- ``test_representative_configs_are_clean`` (default): every kernel and every autotuner
  configuration at the register-hungry head dims, bf16 at 128 and fp16 at 64, and the fused
  loss kernels at bf16 for every column block (32 compiles, about 1-1.5 minutes on two cores
  with a cold Triton cache).
- ``test_full_matrix_is_clean`` (``slow``): head dims 16/32/64/128 x bf16/fp16 and the loss kernels at
  bf16/fp16/fp32, the matrix of the committed report (140 compiles, about 3-5 minutes on two cores with a
  cold cache).
- ``test_committed_report_covers_the_autotune_space``: no compiling; the committed
  bench/results/kernel_report.json lists exactly today's autotuner configurations and loss kernel
  launch configurations, all ok.

The compile tests skip when ptxas or cuobjdump cannot be found. They run the report script in
a subprocess because the CPU suite sets ``TRITON_INTERPRET=1``, which replaces the kernels by
interpreted functions that cannot be compiled.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "kernel_report.py"
COMMITTED_REPORT = REPO / "bench" / "results" / "kernel_report.json"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


kernel_report = _load_report_module()


@pytest.fixture(scope="module")
def tools():
    try:
        return kernel_report.find_tools()
    except kernel_report.ToolMissingError as err:
        pytest.skip(f"cannot compile for sm_90 without the CUDA tools: {err}")


def run_report(out_dir: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(out_dir), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode not in (0, 1):  # 1: some configuration is not ok, reported below
        pytest.fail(f"kernel_report.py failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out_dir / f"{kernel_report.REPORT_NAME}.json").read_text())


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in ("kernel", "dtype", "head_dim", "block_m", "block_n", "num_warps", "num_stages"))


def _loss_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("kernel", "dtype", "block_r", "block_c", "num_warps", "num_stages"))


def assert_clean(report: dict, expected_jobs, expected_loss_jobs=()) -> None:
    rows = [r for r in report["rows"] if r["autotuned"]]
    expected = {_key(vars(job)) for job in expected_jobs}
    assert {_key(r) for r in rows} == expected, "the report does not cover exactly the autotuner's configurations"
    bad = [f"{_key(r)}: {'; '.join(r['problems'])}" for r in rows if not r["ok"]]
    assert not bad, f"{len(bad)} autotuner configurations are not clean on sm_90:\n" + "\n".join(bad)
    loss_rows = report.get("loss_rows", [])
    expected_loss = {_loss_key(vars(job)) for job in expected_loss_jobs}
    assert {_loss_key(r) for r in loss_rows} == expected_loss, \
        "the report does not cover exactly the loss kernels' launch configurations"
    bad = [f"{_loss_key(r)}: {'; '.join(r['problems'])}" for r in loss_rows if not r["ok"]]
    assert not bad, f"{len(bad)} loss kernel configurations are not clean on sm_90:\n" + "\n".join(bad)


def test_representative_configs_are_clean(tools, tmp_path):
    out = tmp_path / "bf16_128"
    report = run_report(out, "--head-dims", "128", "--dtypes", "bf16", "--loss-dtypes", "bf16")
    assert_clean(report, kernel_report.build_jobs(dtypes=["bf16"], head_dims=[128]),
                 kernel_report.build_loss_jobs(dtypes=["bf16"]))
    out = tmp_path / "fp16_64"
    report = run_report(out, "--head-dims", "64", "--dtypes", "fp16", "--no-loss")
    assert_clean(report, kernel_report.build_jobs(dtypes=["fp16"], head_dims=[64]))


@pytest.mark.slow
def test_full_matrix_is_clean(tools, tmp_path):
    report = run_report(tmp_path)
    assert_clean(report, kernel_report.build_jobs(), kernel_report.build_loss_jobs())


def test_committed_report_covers_the_autotune_space():
    if not COMMITTED_REPORT.exists():
        pytest.fail(f"{COMMITTED_REPORT.relative_to(REPO)} is missing: run python bench/kernel_report.py")
    report = json.loads(COMMITTED_REPORT.read_text())
    try:
        assert_clean(report, kernel_report.build_jobs(), kernel_report.build_loss_jobs())
    except AssertionError as err:
        raise AssertionError(f"{err}\nregenerate the report: python bench/kernel_report.py") from None

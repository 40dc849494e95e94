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
- ``test_committed_report_matches_a_fresh_compile``: the presets' head dims (16 and 64), bf16, the
  autotuned kernels (fwd, dK/dV, dQ, dK/dV with atomic dQ) compiled afresh: a deterministic subset of
  the committed report (about 40 compiles, one to two minutes on two cores with a cold cache);
  registers, spills, shared memory, HGMMA and the inner-loop profile must equal the committed rows.
  Skipped, saying why, when the installed triton or ptxas differs from the one that wrote the report
  (another compiler makes other code).
- ``test_full_matrix_is_clean`` (``slow``, and only with ``CROSSMAE_FULL_KERNEL_REPORT=1``): the whole
  matrix of the committed report (about 250 compiles, 5-10 minutes on two cores with a cold cache).
- ``test_committed_report_covers_the_autotune_space``: no compiling; the committed
  bench/results/kernel_report.json lists exactly today's autotuner configurations and loss kernel
  launch configurations, all ok (no spills, at most 240 registers).
- The inner-loop profile's SASS reading and the autotune controls of the kernel file
  (``CROSSMAE_TRITON_*`` environment variables, the DDP broadcast of rank 0's choices) are unit-tested
  on small inputs, without compiling.

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


def test_committed_report_matches_a_fresh_compile(tools, tmp_path):
    committed = json.loads(COMMITTED_REPORT.read_text())
    env = committed["environment"]
    import triton

    here = {"triton": triton.__version__, "ptxas": kernel_report.tool_version(tools["ptxas"])}
    if any(env[k] != v for k, v in here.items()):
        pytest.skip(f"the committed report was compiled by triton {env['triton']} / ptxas {env['ptxas']}, "
                    f"this machine has triton {here['triton']} / ptxas {here['ptxas']}")
    fresh = run_report(tmp_path, "--head-dims", "16", "64", "--dtypes", "bf16", "--no-loss",
                       "--kernels", "fwd", "bwd_dkdv", "bwd_dq", "bwd_dkdv_atomic")
    fields = ("registers", "spill_bytes", "shared_bytes", "hgmma_instructions", "loop")
    old = {_key(r): r for r in committed["rows"]}
    assert fresh["rows"], "the fresh report has no rows"
    for row in fresh["rows"]:
        assert _key(row) in old, f"{_key(row)} is missing from the committed report: regenerate it"
        diff = {f: (old[_key(row)][f], row[f]) for f in fields if old[_key(row)][f] != row[f]}
        assert not diff, (f"{_key(row)} differs from the committed report (committed, fresh): {diff}\n"
                          "regenerate it: python bench/kernel_report.py --baseline <rev> (see its header)")


@pytest.mark.slow
def test_full_matrix_is_clean(tools, tmp_path):
    if os.environ.get("CROSSMAE_FULL_KERNEL_REPORT") != "1":
        pytest.skip("the full matrix takes 5-10 minutes on two cores: set CROSSMAE_FULL_KERNEL_REPORT=1")
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


# --------------------------------------------------------------------------------------
# The inner-loop profile, on a hand-written SASS listing
# --------------------------------------------------------------------------------------
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/                   FMNMX R2, R24, R25, !PT ;
        /*0050*/                   FFMA R3, R24, R4, -R2 ;
        /*0060*/                   MUFU.EX2 R3, R3 ;
        /*0070*/                   FADD R5, R5, R3 ;
        /*0080*/                   WARPGROUP.ARRIVE ;
        /*0090*/                   HGMMA.64x16x16.F32.BF16 R40, R8, gdesc[UR8], R40, gsb0 ;
        /*00a0*/                   LDS R6, [R7] ;
        /*00b0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00c0*/               @P0 BRA 0x10 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0 ;
"""


def test_profile_reads_the_main_loop():
    job = kernel_report.KernelJob("fwd", "bf16", 16, 64, 64, 4, 2)
    profile = kernel_report.profile_main_loop(_SASS, job)
    assert profile.loop_bytes == (0x10, 0xC0)
    assert (profile.instructions, profile.hgmma, profile.ex2, profile.fp32_alu, profile.lds_sts,
            profile.bar_sync) == (12, 2, 1, 3, 1, 1)
    rates = kernel_report.H200
    first, second = 2 * 64 * 64 * 16 / rates.mma_flops_16bit, 2 * 64 * 16 * 16 / rates.mma_flops_16bit
    assert profile.tensor_cycles == first + second
    assert profile.mufu_cycles == 4 * 32 / rates.mufu_lanes
    assert profile.issue_cycles == 12  # 12 instructions x 4 warps / 4 schedulers
    # The second group (P V) is in flight from its HGMMA, round the loop, to the wait after the first
    # (S): HGMMA, LDS, BAR, BRA, then ARRIVE and the first HGMMA of the next iteration: 6 issue cycles
    # beside it. The first group's window is empty; DEPBAR, the softmax and ARRIVE (6 issue cycles,
    # 8 MUFU cycles: 4 warps x 32 lanes / 16) are exposed.
    assert profile.overlapped_issue_cycles == 6
    assert profile.predicted_cycles == first + max(second, 6) + max(6, profile.mufu_cycles)
    assert profile.predicted_cycles >= max(profile.tensor_cycles, profile.mufu_cycles, profile.issue_cycles)
    assert profile.useful_flops == 2 * 2 * 64 * 64 * 16
    assert profile.predicted_fraction == pytest.approx(
        profile.useful_flops / (rates.mma_flops_16bit * profile.predicted_cycles))


def test_profile_without_a_loop_is_none():
    job = kernel_report.KernelJob("fwd", "bf16", 16, 64, 64, 4, 2)
    assert kernel_report.profile_main_loop("        /*0000*/                   EXIT ;\n", job) is None


# --------------------------------------------------------------------------------------
# Autotune controls of the attention kernels (no compiling)
# --------------------------------------------------------------------------------------
@pytest.fixture
def va():
    from crossmae_kernels import varlen_attention

    return varlen_attention


def _shape(config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def test_single_config_keeps_the_first_that_fits(va):
    import torch

    for kind, configs in (("fwd", va.FWD_CONFIGS), ("dkdv", va.BWD_DKDV_CONFIGS), ("dq", va.BWD_DQ_CONFIGS)):
        for dtype in (torch.bfloat16, torch.float32):
            for head_dim in (16, 24, 64, 128):
                kept = va.prune_configs(configs, head_dim, dtype, kind)
                single = va.select_configs(configs, head_dim, dtype, kind, {va.SINGLE_CONFIG_ENV: "1"})
                assert [_shape(c) for c in single] == [_shape(kept[0])]
                assert va.select_configs(configs, head_dim, dtype, kind, {}) == kept
    with pytest.raises(ValueError, match=va.SINGLE_CONFIG_ENV):
        va.select_configs(va.FWD_CONFIGS, 64, torch.bfloat16, "fwd", {va.SINGLE_CONFIG_ENV: "yes"})


def test_pinned_config(va):
    import torch

    env = {va.CONFIG_ENV["fwd"]: "64,64,4,3", va.SINGLE_CONFIG_ENV: "1"}
    assert [_shape(c) for c in va.select_configs(va.FWD_CONFIGS, 64, torch.bfloat16, "fwd", env)] == [(64, 64, 4, 3)]
    for bad in ("64,64,4", "64,64,four,3", "48,64,4,3", "64,64,4,0", "8,64,4,3"):
        with pytest.raises(ValueError, match="CROSSMAE_TRITON_CONFIG_DQ"):
            va.select_configs(va.BWD_DQ_CONFIGS, 64, torch.bfloat16, "dq", {va.CONFIG_ENV["dq"]: bad})
    with pytest.raises(ValueError, match="CROSSMAE_TRITON_CONFIG_FWD.*does not fit"):
        va.select_configs(va.FWD_CONFIGS, 128, torch.bfloat16, "fwd", {va.CONFIG_ENV["fwd"]: "128,128,4,3"})


def test_autotune_choices_round_trip_and_broadcast(va, tmp_path):
    import torch.distributed as dist

    key = (64, "ieee", "torch.bfloat16")
    saved = {kind: dict(tuned.cache) for kind, tuned in va._TUNED.items()}
    try:
        va.apply_autotune_choices({"fwd": [(key, (128, 64, 8, 3))]})
        assert (key, (128, 64, 8, 3)) in va.autotune_choices()["fwd"]
        with pytest.raises(ValueError, match="unknown kernel"):
            va.apply_autotune_choices({"attn": []})
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            choices = va.broadcast_autotune_choice()
        finally:
            dist.destroy_process_group()
        assert (key, (128, 64, 8, 3)) in choices["fwd"]
        assert _shape(va._TUNED["fwd"].cache[key]) == (128, 64, 8, 3)
    finally:
        for kind, tuned in va._TUNED.items():
            tuned.cache.clear()
            tuned.cache.update(saved[kind])

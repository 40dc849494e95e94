"""bench/gpu_check.sh's dry run on this CPU: stage budgets, commands, and the GPU test plan's compile count."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import gpu_test_plan

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 420  # seven minutes for every default stage together
HEADLINE = ("attention", "decoder")  # the stages that must run first: the headline rows


@pytest.fixture(scope="module")
def dry_run() -> str:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_dry_run_prints_every_stage_with_a_budget_within_seven_minutes(dry_run):
    stages = re.findall(r"^  (\w+) +(\d+) s  (.+)$", dry_run, flags=re.M)
    names = [name for name, _, _ in stages]
    assert names[0] == "setup" and names[1:3] == list(HEADLINE), names
    assert {"tests", "step", "data", "wide", "train"} <= set(names)
    budgets = [int(seconds) for _, seconds, _ in stages]
    assert sum(budgets) <= LIMIT_S, budgets
    assert f"stage budgets: {sum(budgets)} s in all" in dry_run
    commands = dict((name, command) for name, _, command in stages)
    assert "--preset seed,wide --dtype bf16" in commands["attention"] and "torch_varlen,triton" in commands["attention"]
    assert "decoder_speed.py --preset seed" in commands["decoder"]
    assert "bench.gpu_test_plan --run -v" in commands["tests"]
    step = commands["step"].split()
    assert step[1:3] == ["-m", "pytest"] and "-m" in step[3:] and step[step.index("-m", 3) + 1] == "gpu"
    assert {"tests/test_buckets.py", "tests/test_device_data.py", "tests/test_train_step_sync.py"} <= set(step)
    assert "data_speed.py --preset seed --stages getitem+collate,device --workers 0,4 --device cuda" in commands["data"]
    assert "C compiler" in dry_run.splitlines()[0] or "no C compiler" in dry_run.splitlines()[0]


def test_dry_run_plans_the_gpu_tests_within_the_compile_limit(dry_run):
    match = re.search(r"gpu test plan: ok: (\d+) triton compiles \(limit (\d+)\)", dry_run)
    assert match, dry_run
    compiles, limit = int(match[1]), int(match[2])
    assert 0 < compiles <= limit <= 30
    assert "order: fp32 and flex last" in dry_run


def test_named_regional_stages_time_the_regional_preset():
    result = subprocess.run(["bash", "bench/gpu_check.sh", "regional", "regional_train"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    commands = dict((name, command) for name, _, command in re.findall(r"^  (\w+) +(\d+) s  (.+)$", result.stdout,
                                                                        flags=re.M))
    assert "decoder_speed.py --preset regional" in commands["regional"]
    assert "train_speed.py --preset regional" in commands["regional_train"]


def test_the_data_stage_uses_flags_the_data_benchmark_accepts():
    """The data stage's flags parse (no GPU needed: only the device check would refuse cuda here)."""
    from bench.data_speed import build_parser

    result = subprocess.run(["bash", "bench/gpu_check.sh", "data"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    command = re.search(r"^  data +\d+ s  (.+)$", result.stdout, flags=re.M)[1].split()
    args = build_parser().parse_args(command[2:])
    assert (args.preset, args.stages, args.workers, args.device) == ("seed", "getitem+collate,device", "0,4", "cuda")


def test_gpu_check_rejects_an_unknown_stage():
    result = subprocess.run(["bash", "bench/gpu_check.sh", "nope"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}, timeout=60)
    assert result.returncode == 2 and "unknown stage nope" in result.stdout


def case(backend, dtype, head_dim, total_q):
    """Stands in for a GPU test's case parameter."""
    return SimpleNamespace(backend=backend, dtype=dtype, head_dim=head_dim, total_q=lambda: total_q)


def items(*cases):
    """Stand in for collected pytest items with a ``case`` parameter each."""
    return [SimpleNamespace(nodeid=f"t[{i}]", callspec=SimpleNamespace(params={"case": c}))
            for i, c in enumerate(cases)]


def test_plan_counts_one_compile_per_kernel_and_specialisation():
    import torch

    plan = gpu_test_plan.plan_items(items(
        case("triton", torch.bfloat16, 16, 100),
        case("triton", torch.bfloat16, 16, 101),  # same alignment of total_q: no new compile
        case("torch_varlen", torch.float16, 32, 100),  # not Triton: none
        case("triton", torch.bfloat16, 16, 96),  # total_q % 16 == 0: a new specialisation
        case("triton", torch.float32, 48, 10),
    ))
    kernels = len(gpu_test_plan.TRITON_KERNELS)
    assert plan.compiles == 3 * kernels
    assert plan.autotuned_compiles >= plan.compiles
    assert not plan.order_errors


def test_plan_finds_missing_coverage_and_bad_order():
    import torch

    plan = gpu_test_plan.plan_items(items(
        case("flex", torch.bfloat16, 16, 10),
        case("triton", torch.float32, 16, 10),
        case("triton", torch.bfloat16, 64, 10),  # after flex and fp32
    ))
    problems = plan.problems()
    assert any("no fp16 case" in p for p in problems)
    assert any("head-dim tile 32" in p for p in problems)
    assert any("padded lanes" in p for p in problems)
    assert any(p.startswith("out of order") for p in problems)

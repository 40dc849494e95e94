"""The GPU test stage of ``bench/gpu_check.sh``: which tests it runs and how many Triton compiles they trigger.

On a GPU a cold Triton compile takes about a second (bf16) to several (fp32), so the test stage's
time is mostly its compiles. Under ``CROSSMAE_TRITON_SINGLE_CONFIG=1`` every autotuned kernel sees
one configuration, and a kernel compiles once per specialisation it meets. Triton specialises a
kernel on its constexprs (head dim, head-dim tile, dot precision, blocks), on its tensors' dtypes
and on each integer argument's divisibility by 16. The tests' tensors are contiguous with head
counts and head dims that are multiples of 16 except the row count ``total_q`` (the stride of the
log-sum-exp rows), so the key of one compile is (kernel, head dim, dtype, ``total_q % 16 == 0``).
A Triton case runs forward and backward: the forward kernel, the backward preprocess, the dK/dV
pass and the dQ pass.

Commands (from the repository root; no GPU needed to plan)::

    python -m bench.gpu_test_plan                 # collect the tests here, print the plan, check the limits
    python -m bench.gpu_test_plan --run [ARGS]    # run them (gpu_check.sh's test stage); ARGS go to pytest

The plan fails (exit 1) when the compiles exceed :data:`MAX_COMPILES`, when a kernel misses a
dtype or a head-dim tile, or when fp32 or FlexAttention cases come before the others. With
``--run`` on a GPU the summary adds the compiles that actually happened, read from Triton's
kernel caches.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from bench.harness import dtype_name

TEST_FILES = ("tests/test_varlen_attention_gpu.py",)
MARKERS = "gpu and not slow"
MAX_COMPILES = 30
# what --run sets (unless already set): one config per autotuned kernel, autotune results cached on disk
RUN_ENV = {"CROSSMAE_TRITON_SINGLE_CONFIG": "1", "TRITON_CACHE_AUTOTUNING": "1"}
# kernel -> the kind prune_configs knows it by (None: launched with fixed blocks, not autotuned)
TRITON_KERNELS = {"fwd": "fwd", "bwd_preprocess": None, "bwd_dkdv": "dkdv", "bwd_dq": "dq"}
JIT_FUNCTIONS = {
    "fwd": "_varlen_attn_fwd_kernel",
    "bwd_preprocess": "_varlen_attn_bwd_preprocess_kernel",
    "bwd_dkdv": "_varlen_attn_bwd_dkdv_kernel",
    "bwd_dq": "_varlen_attn_bwd_dq_kernel",
}
LAST_KINDS = ("fp32", "flex")  # cases of these kinds must come after every other case


@dataclass
class TestPlan:
    """What a collection of GPU tests will run.

    Attributes:
        tests: node ids in run order.
        cases: (node id, backend, dtype name, head dim, total_q) of every test with a case.
        compile_keys: the distinct (kernel, head dim, dtype name, total_q % 16 == 0) of the Triton cases.
        autotuned_compiles: what the same keys compile without the single-config switch.
        order_errors: cases of :data:`LAST_KINDS` that come before another kind.
    """

    tests: list[str] = field(default_factory=list)
    cases: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    compile_keys: set[tuple[str, int, str, bool]] = field(default_factory=set)
    autotuned_compiles: int = 0
    order_errors: list[str] = field(default_factory=list)

    @property
    def compiles(self) -> int:
        return len(self.compile_keys)

    def missing_coverage(self) -> list[str]:
        """Kernels that meet a supported dtype or head-dim tile in no case, and whether padded lanes are met."""
        from crossmae_kernels.varlen_attention import MAX_HEAD_DIM, MIN_HEAD_DIM, SUPPORTED_DTYPES, block_head_dim

        dtypes = {dtype_name(d) for d in SUPPORTED_DTYPES}
        tiles = {block_head_dim(d) for d in range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1, 8)}
        missing = []
        for kernel in TRITON_KERNELS:
            keys = [k for k in self.compile_keys if k[0] == kernel]
            for name in sorted(dtypes - {k[2] for k in keys}):
                missing.append(f"{kernel}: no {name} case")
            for tile in sorted(tiles - {block_head_dim(k[1]) for k in keys}):
                missing.append(f"{kernel}: no case with head-dim tile {tile}")
            if not any(block_head_dim(k[1]) != k[1] for k in keys):
                missing.append(f"{kernel}: no head dim below its tile (padded lanes)")
        return missing

    def problems(self) -> list[str]:
        out = []
        if self.compiles > MAX_COMPILES:
            out.append(f"{self.compiles} Triton compiles, more than {MAX_COMPILES}")
        out += self.missing_coverage()
        out += [f"out of order: {e}" for e in self.order_errors]
        return out

    def lines(self) -> list[str]:
        """The plan as printed lines."""
        by_backend: dict[str, int] = {}
        for _, backend, *_ in self.cases:
            by_backend[backend] = by_backend.get(backend, 0) + 1
        pairs = sorted({(k[1], k[2]) for k in self.compile_keys})
        return [
            f"gpu test plan: {len(self.tests)} tests ({', '.join(f'{b} {n}' for b, n in by_backend.items())}), "
            f"markers {MARKERS!r}",
            f"triton (head dim, dtype) pairs: {', '.join(f'D{d} {t}' for d, t in pairs) or 'none'}",
            f"triton compiles with {'='.join(next(iter(RUN_ENV.items())))}: {self.compiles} "
            f"(limit {MAX_COMPILES}; {len(TRITON_KERNELS)} kernels x {len(pairs)} pairs, split by total_q % 16); "
            f"without it: {self.autotuned_compiles}",
            f"flex cases (compiled by inductor): {sum(1 for c in self.cases if c[1] == 'flex')}, "
            f"fp32 cases: {sum(1 for c in self.cases if c[2] == 'fp32')}; order: "
            + ("fp32 and flex last" if not self.order_errors else "; ".join(self.order_errors)),
        ]


def case_kind(backend: str, dtype: str) -> str:
    return "flex" if backend == "flex" else "fp32" if dtype == "fp32" else "other"


def plan_items(items: Sequence[pytest.Item]) -> TestPlan:
    """The plan of collected test items; a test's case is its ``case`` parameter (backend, dtype, head_dim)."""
    from crossmae_kernels.varlen_attention import BWD_DKDV_CONFIGS, BWD_DQ_CONFIGS, FWD_CONFIGS, prune_configs

    configs = {"fwd": FWD_CONFIGS, "dkdv": BWD_DKDV_CONFIGS, "dq": BWD_DQ_CONFIGS}
    plan = TestPlan(tests=[item.nodeid for item in items])
    seen_last: list[str] = []
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case is None:
            continue
        name = dtype_name(case.dtype)
        total_q = case.total_q()
        plan.cases.append((item.nodeid, case.backend, name, case.head_dim, total_q))
        kind = case_kind(case.backend, name)
        if kind == "other" and seen_last:
            plan.order_errors.append(f"{item.nodeid} runs after {seen_last[0]}")
        elif kind != "other":
            seen_last.append(item.nodeid)
        if case.backend != "triton":
            continue
        for kernel, prune_kind in TRITON_KERNELS.items():
            key = (kernel, case.head_dim, name, total_q % 16 == 0)
            if key in plan.compile_keys:
                continue
            plan.compile_keys.add(key)
            if prune_kind is None:
                plan.autotuned_compiles += 1
            else:
                kept = prune_configs(configs[prune_kind], case.head_dim, case.dtype, prune_kind)
                plan.autotuned_compiles += len(kept)
    return plan


def triton_compiled() -> dict[str, int] | None:
    """Kernels compiled so far in this process, per kernel (Triton's per-device kernel caches); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    from crossmae_kernels import varlen_attention

    counts = {}
    for kernel, attr in JIT_FUNCTIONS.items():
        caches = getattr(getattr(varlen_attention, attr), "device_caches", {})
        counts[kernel] = sum(len(entry[0]) for entry in caches.values())
    return counts


class PlanPlugin:
    """pytest plugin: computes the plan after collection, prints it, and the compiles at the end."""

    def __init__(self) -> None:
        self.plan: TestPlan | None = None

    @pytest.hookimpl(trylast=True)  # after -m has deselected
    def pytest_collection_modifyitems(self, items):
        self.plan = plan_items(items)

    def pytest_report_collectionfinish(self):
        return self.plan.lines() if self.plan else []

    def pytest_terminal_summary(self, terminalreporter):
        if self.plan is None:
            return
        compiled = triton_compiled()
        if compiled is not None:
            terminalreporter.write_line(
                f"triton compiles in this run: {sum(compiled.values())} "
                f"({', '.join(f'{k} {n}' for k, n in compiled.items())}); planned {self.plan.compiles}")


def pytest_args(extra: Sequence[str] = ()) -> list[str]:
    """The selection, without the project's addopts (they name pytest-benchmark's flags: a plugin these
    tests don't need)."""
    return ["-o", "addopts=", "-m", MARKERS, "-p", "no:cacheprovider", *extra, *TEST_FILES]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_test_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the tests (on a GPU) instead of only planning them")
    args, extra = parser.parse_known_args(argv)
    plugin = PlanPlugin()
    if args.run:
        for key, value in RUN_ENV.items():
            os.environ.setdefault(key, value)
        print(" ".join(f"{k}={os.environ[k]}" for k in RUN_ENV), flush=True)
        return int(pytest.main(pytest_args(extra), plugins=[plugin]))
    status = pytest.main(pytest_args(["--collect-only", "-q", *extra]), plugins=[plugin])
    if status != 0 or plugin.plan is None:
        print(f"collecting the GPU tests failed (pytest exit {int(status)})", file=sys.stderr)
        return 1
    problems = plugin.plan.problems()
    for problem in problems:
        print(f"PLAN PROBLEM: {problem}", file=sys.stderr)
    print(f"gpu test plan: {'ok' if not problems else 'FAILED'}: {plugin.plan.compiles} triton compiles "
          f"(limit {MAX_COMPILES})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

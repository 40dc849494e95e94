"""Static Hopper (sm_90) report of every Triton kernel in ``crossmae_kernels``: the attention
kernels of ``varlen_attention`` and the fused loss kernels of ``packed_mse``.

No GPU is needed: Triton's compiler and the CUDA tools bundled with the triton package
(``ptxas``, ``cuobjdump`` under ``triton/backends/nvidia/bin``) run on any x86 machine. Until a
GPU is lent, this report is the evidence that the kernels are built for the hardware.

Method
    1. Jobs. For each kernel (forward, backward preprocess, backward dK/dV, backward dQ), each
       dtype (bf16, fp16) and head dim (16, 32, 64, 128), every autotune configuration that
       ``prune_configs`` keeps, that is, exactly the configurations the autotuner may pick.
       The preprocess kernel has no autotuner: it runs with BLOCK_M=64 and Triton's default
       num_warps=4, num_stages=3.
    2. Compile. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` with the
       signature the launcher's arguments specialise to at run time, as Triton's JIT would:
         - tensors: ``*bf16``/``*fp16`` (q, k, v, out, grads), ``*fp32`` (lse, delta),
           ``*i32`` (cu_seqlens), all 16-byte aligned (``tt.divisibility = 16``);
         - last-dim strides (``stride_*d``) equal 1, which the JIT turns into the constant 1;
         - token and head strides of q/k/v/out/dO/dq/dk/dv are multiples of 16 (they are
           ``H * D`` and ``D``, and every head dim in the report is a multiple of 16);
           strides of lse/delta and ``total_q`` (both the token count) get no hint;
         - constexprs as the launchers pass them: HEAD_DIM, BLOCK_D = block_head_dim(HEAD_DIM),
           BLOCK_M, BLOCK_N, DOT_PRECISION = "ieee" (16-bit inputs);
         - options num_warps / num_stages from the configuration, FP fusion at Triton's default.
    3. Inspect.
         - ``cuobjdump --dump-resource-usage`` on the cubin: registers per thread (REG) and
           the per-thread stack frame plus local memory (STACK + LOCAL, bytes). ptxas puts
           spilled registers in the stack frame, and these kernels are fully inlined with no
           local arrays, so a non-zero frame means spills (it equals the "bytes stack frame"
           of ``ptxas -v``); the SASS's local loads/stores (LDL/STL) are counted as a
           cross-check. The ptxas is the one Triton itself runs for sm_90.
         - Shared memory: Triton's dynamic allocation (``metadata.shared``), checked against
           the 227 KiB an sm_90 block may use.
         - ``cuobjdump -sass``: HGMMA instructions (Hopper's warpgroup tensor-core MMA).
         - TTIR: the shape of every ``tl.dot`` (M x N x K and its element type).
         - TTGIR: whether each dot became ``ttng.warp_group_dot`` (MMAv3) and its MMA layout's
           ``warpsPerCTA``.

The fused loss kernels (``packed_mse``: ``loss_fwd``, ``loss_bwd``)
    Elementwise and reduction kernels with no ``tl.dot``, so no HGMMA is expected: a
    configuration is ok when it does not spill and fits shared memory. Jobs: pred in bf16, fp16
    and fp32 (target, weight and the partial sums fp32; the gradient in pred's dtype; the
    incoming scalar gradient fp32), each BLOCK_C the launcher can choose (16, 32, 64, 128:
    ``_block_c`` of the column count) with the BLOCK_R it pairs with it (``block_rows``), with Triton's
    default num_warps=4, num_stages=3 (the launchers pass neither). Specialisation: pointers
    16-byte aligned, ``n_rows``, ``n_cols`` and the row strides plain i32 with no divisibility
    hint (a row stride is the column count, rarely a multiple of 16).

When HGMMA is expected (Triton's MMAv3 rule)
    Triton's ``AccelerateMatmul`` pass lowers a ``tl.dot`` to a warpgroup MMA on sm_90 when
    ``supportMMA(dot, 3)`` holds (lib/Analysis/Utility.cpp): A/B are fp16, bf16, fp8, int8 or
    tf32-precision fp32 (fp32 with input_precision "ieee" never uses tensor cores), the result
    is 2-D with M % 64 == 0 and N % 8 == 0, K >= 256 / element bits (16 for 16-bit types), and
    num_warps % 4 == 0. The report expects a warpgroup MMA for exactly the dots that pass this
    rule (in these kernels all dots of a configuration pass it, or none do).

    A second rule decides whether the warpgroups do useful work: ``warpsPerTileV3`` gives a
    dot whose result feeds another dot (the attention chains S -> P -> P V, S -> dS -> dS K,
    ...) all warps along M, 16 rows each, so a tile with fewer than 16 * num_warps rows is
    replicated across warpgroups (e.g. BLOCK_M=64 with 8 warps: two warpgroups compute the
    same 64 rows). The report flags such a dot as "redundant warpgroups".

    A configuration is ok when it does not spill, fits shared memory, uses HGMMA exactly
    where the rule expects it, and has no redundant warpgroups.

Run
    python bench/kernel_report.py                 # full matrix, writes bench/results/kernel_report.{md,json}
    python bench/kernel_report.py --head-dims 64 --dtypes bf16 --out-dir /tmp/report
    python bench/kernel_report.py --all-configs   # also the configurations prune_configs drops
    python bench/kernel_report.py --no-loss       # the attention kernels only
Exit status 1 when a configuration the autotuner may pick, or a loss kernel job, is not ok.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TARGET_ARCH = 90
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = ("bf16", "fp16")
KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
PREPROCESS_BLOCK_M = 64  # what varlen_attn_bwd launches the preprocess kernel with
PREPROCESS_NUM_WARPS, PREPROCESS_NUM_STAGES = 4, 3  # Triton defaults: the launch passes neither
SM90_MAX_SMEM_PER_BLOCK = 227 * 1024
REPORT_NAME = "kernel_report"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"

# kernel name -> (jit function name in the kernel module, prune_configs kind, config list name)
_KERNEL_SOURCES = {
    "fwd": ("_varlen_attn_fwd_kernel", "fwd", "FWD_CONFIGS"),
    "bwd_preprocess": ("_varlen_attn_bwd_preprocess_kernel", None, None),
    "bwd_dkdv": ("_varlen_attn_bwd_dkdv_kernel", "dkdv", "BWD_DKDV_CONFIGS"),
    "bwd_dq": ("_varlen_attn_bwd_dq_kernel", "dq", "BWD_DQ_CONFIGS"),
}

_ALIGNED = [["tt.divisibility", 16]]

LOSS_KERNELS = ("loss_fwd", "loss_bwd")
LOSS_DTYPES = ("bf16", "fp16", "fp32")
LOSS_BLOCK_CS = (16, 32, 64, 128)  # what packed_mse._block_c can return
_LOSS_SOURCES = {"loss_fwd": "_masked_sse_fwd_kernel", "loss_bwd": "_masked_sse_bwd_kernel"}


class ToolMissingError(RuntimeError):
    """ptxas or cuobjdump (bundled with triton's NVIDIA backend) cannot be found or run."""


@dataclass(frozen=True)
class KernelJob:
    """One kernel compilation: a kernel at one dtype, head dim and configuration."""

    kernel: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int | None
    num_warps: int
    num_stages: int
    autotuned: bool = True  # False: prune_configs drops it (compiled only with --all-configs)


@dataclass
class DotInfo:
    """One ``tl.dot`` as the compiler sees it."""

    m: int
    n: int
    k: int
    elem_type: str
    mmav3_allowed: bool


@dataclass
class KernelResult:
    """What the compiler made of one job."""

    job: KernelJob
    registers: int
    spill_bytes: int  # stack frame + local memory per thread: where ptxas puts spilled registers
    spill_instructions: int  # LDL + STL in the SASS
    shared_bytes: int  # Triton's dynamic shared-memory allocation per block
    hgmma_instructions: int
    dots: list[DotInfo]
    warpgroup_dots: int  # dots lowered to ttng.warp_group_dot
    plain_dots: int  # dots left as tt.dot after lowering (MMAv2 or FMA)
    redundant_warpgroup_dots: int  # warpgroup dots whose MMA layout repeats rows across warpgroups
    compile_seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def hgmma(self) -> bool:
        return self.hgmma_instructions > 0

    @property
    def expected_hgmma(self) -> bool:
        return any(d.mmav3_allowed for d in self.dots)

    @property
    def ok(self) -> bool:
        return not self.problems

    def row(self) -> dict:
        job = dataclasses.asdict(self.job)
        return {
            **job,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "spill_instructions": self.spill_instructions,
            "shared_bytes": self.shared_bytes,
            "hgmma": self.hgmma,
            "hgmma_instructions": self.hgmma_instructions,
            "expected_hgmma": self.expected_hgmma,
            "dots": [f"{d.m}x{d.n}x{d.k} {d.elem_type}" for d in self.dots],
            "warpgroup_dots": self.warpgroup_dots,
            "plain_dots": self.plain_dots,
            "redundant_warpgroup_dots": self.redundant_warpgroup_dots,
            "compile_seconds": round(self.compile_seconds, 2),
            "ok": self.ok,
            "problems": self.problems,
        }


# --------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------
def find_tools() -> dict[str, str]:
    """Paths of the ptxas and cuobjdump that triton uses; raises ToolMissingError if absent."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    lookups = {"ptxas": lambda: get_ptxas(TARGET_ARCH), "cuobjdump": lambda: triton.knobs.nvidia.cuobjdump}
    tools = {}
    for name, lookup in lookups.items():
        try:
            tools[name] = lookup().path
        except RuntimeError as err:
            raise ToolMissingError(
                f"{name} for sm_{TARGET_ARCH} not found: triton's NVIDIA backend ships it under "
                f"triton/backends/nvidia/bin ({err})"
            ) from err
    return tools


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\S+?),? ", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------
def _kernel_module():
    from crossmae_kernels import varlen_attention

    return varlen_attention


def build_jobs(kernels: Iterable[str] = KERNELS, dtypes: Iterable[str] = DTYPES,
               head_dims: Iterable[int] = HEAD_DIMS, all_configs: bool = False) -> list[KernelJob]:
    """The compilations the report needs: the configurations ``prune_configs`` keeps.

    With ``all_configs`` the dropped configurations are added, marked ``autotuned=False``.
    """
    va = _kernel_module()
    jobs = []
    for kernel in kernels:
        if kernel not in _KERNEL_SOURCES:
            raise ValueError(f"unknown kernel {kernel!r}, expected one of {KERNELS}")
        _, kind, list_name = _KERNEL_SOURCES[kernel]
        for dtype in dtypes:
            torch_dtype = _torch_dtype(dtype)
            for head_dim in head_dims:
                if not va.head_dim_supported(head_dim):
                    raise ValueError(f"head dim {head_dim} is not supported by the triton kernels")
                if kind is None:
                    jobs.append(KernelJob(kernel, dtype, head_dim, PREPROCESS_BLOCK_M, None,
                                          PREPROCESS_NUM_WARPS, PREPROCESS_NUM_STAGES))
                    continue
                configs = getattr(va, list_name)
                kept = va.prune_configs(configs, head_dim, torch_dtype, kind)
                for config in configs:
                    autotuned = any(config is c for c in kept)
                    if autotuned or all_configs:
                        jobs.append(KernelJob(
                            kernel, dtype, head_dim, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                            config.num_warps, config.num_stages, autotuned,
                        ))
    return jobs


def pruned_configs(kernels: Iterable[str] = KERNELS, dtypes: Iterable[str] = DTYPES,
                   head_dims: Iterable[int] = HEAD_DIMS) -> list[dict]:
    """Configurations of the autotune lists that ``prune_configs`` drops (for the report)."""
    return [
        {k: v for k, v in dataclasses.asdict(job).items() if k != "autotuned"}
        for job in build_jobs(kernels, dtypes, head_dims, all_configs=True)
        if not job.autotuned
    ]


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}") from None


def make_source(job: KernelJob):
    """The ASTSource the JIT would build for this job (see the module docstring)."""
    from triton.compiler import ASTSource

    va = _kernel_module()
    fn = getattr(va, _KERNEL_SOURCES[job.kernel][0])
    constexpr_values = {
        "HEAD_DIM": job.head_dim,
        "BLOCK_D": va.block_head_dim(job.head_dim),
        "BLOCK_M": job.block_m,
        "BLOCK_N": job.block_n,
        "DOT_PRECISION": "ieee",
    }
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int], list] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            if name not in constexpr_values or constexpr_values[name] is None:
                raise ValueError(f"{fn.__name__}: no value for constexpr {name}")
            signature[name] = "constexpr"
            constexprs[name] = constexpr_values[name]
        elif name.startswith("cu_seqlens"):
            signature[name] = "*i32"
            attrs[(index,)] = _ALIGNED
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
            attrs[(index,)] = _ALIGNED
        elif name[0].isupper():
            signature[name] = f"*{job.dtype}"
            attrs[(index,)] = _ALIGNED
        elif re.fullmatch(r"stride_\w+d", name):
            signature[name] = "constexpr"  # unit stride: the JIT specialises the value 1
            constexprs[name] = 1
        elif re.fullmatch(r"stride_(lse|delta)_h", name) or name == "total_q":
            signature[name] = "i32"
        elif name.startswith("stride_"):
            signature[name] = "i32"
            attrs[(index,)] = _ALIGNED
        elif name.endswith("_scale"):
            signature[name] = "fp32"
        else:
            raise ValueError(f"{fn.__name__}: don't know how the launcher passes parameter {name!r}")
    return ASTSource(fn, signature, constexprs, attrs)


# --------------------------------------------------------------------------------------
# Compile and inspect
# --------------------------------------------------------------------------------------
_TTIR_DOT = re.compile(r"=\s*tt\.dot\s.*:\s*tensor<(\d+)x(\d+)x(\w+)>\s*\*\s*tensor<(\d+)x(\d+)x\w+>\s*->")
_TTGIR_MMA_ALIAS = re.compile(
    r"^(#mma\d*)\s*=\s*#ttg\.nvidia_mma<\{versionMajor\s*=\s*(\d+).*?warpsPerCTA\s*=\s*\[(\d+),\s*(\d+)\]"
    r".*?instrShape\s*=\s*\[(\d+),", re.MULTILINE)
_TTGIR_WGMMA = re.compile(r"ttng\.warp_group_dot\s.*->\s*tensor<(\d+)x(\d+)xf32,\s*(#mma\d*)>")
_TTGIR_DOT = re.compile(r"\btt\.dot\s")
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_ELEM_BITS = {"f16": 16, "bf16": 16, "f32": 32, "f64": 64, "i8": 8, "f8E5M2": 8, "f8E4M3FN": 8}


def mmav3_allowed(m: int, n: int, k: int, elem_type: str, num_warps: int) -> bool:
    """Triton's ``supportMMA(dot, 3)`` for 16-bit inputs (fp32 "ieee" dots never qualify)."""
    bits = _ELEM_BITS.get(elem_type, 0)
    return (elem_type in ("f16", "bf16") and num_warps % 4 == 0 and m % 64 == 0 and n % 8 == 0
            and k >= 256 // bits)


def parse_ttir_dots(ttir: str, num_warps: int) -> list[DotInfo]:
    dots = []
    for match in _TTIR_DOT.finditer(ttir):
        m, k, elem, k2, n = int(match[1]), int(match[2]), match[3], int(match[4]), int(match[5])
        if k != k2:
            raise ValueError(f"TTIR dot with mismatched K ({k} vs {k2}): {match[0]}")
        dots.append(DotInfo(m, n, k, elem, mmav3_allowed(m, n, k, elem, num_warps)))
    if len(dots) != ttir.count("tt.dot "):
        raise ValueError("could not parse every tt.dot in the TTIR; has Triton's IR format changed?")
    return dots


def parse_ttgir_warpgroup_dots(ttgir: str) -> tuple[int, int, int]:
    """(warpgroup dots, plain tt.dot left over, warpgroup dots with rows repeated across warpgroups)."""
    layouts = {alias: (int(major), int(wm), int(instr_m))
               for alias, major, wm, _wn, instr_m in _TTGIR_MMA_ALIAS.findall(ttgir)}
    wgmma = redundant = 0
    for m, _n, alias in _TTGIR_WGMMA.findall(ttgir):
        if alias not in layouts:
            raise ValueError(f"TTGIR layout {alias} of a warp_group_dot not found; has Triton's IR format changed?")
        _, warps_m, instr_m = layouts[alias]
        wgmma += 1
        if warps_m * instr_m > int(m):
            redundant += 1
    if wgmma != len(re.findall(r"ttng\.warp_group_dot\s", ttgir)):
        raise ValueError("could not parse every ttng.warp_group_dot in the TTGIR; has Triton's IR format changed?")
    return wgmma, len(_TTGIR_DOT.findall(ttgir)), redundant


def cubin_resources(cubin: bytes, cuobjdump: str) -> tuple[dict[str, int], str]:
    """(resource usage of the kernel, SASS text) from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    match = _RESOURCE.search(usage)
    if match is None:
        raise ValueError(f"cuobjdump --dump-resource-usage printed no REG/LOCAL line:\n{usage}")
    reg, stack, shared, local = map(int, match.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}, sass


def compile_and_inspect(job: KernelJob) -> KernelResult:
    """Compile one job for sm_90 and read back registers, spills, shared memory and HGMMA use."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = find_tools()
    options = {
        "num_warps": job.num_warps,
        "num_stages": job.num_stages,
        "enable_fp_fusion": triton.knobs.language.default_fp_fusion,
    }
    start = time.perf_counter()
    compiled = triton.compile(make_source(job), target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)
    seconds = time.perf_counter() - start
    usage, sass = cubin_resources(compiled.asm["cubin"], tools["cuobjdump"])
    dots = parse_ttir_dots(compiled.asm["ttir"], job.num_warps)
    wgmma, plain_dots, redundant = parse_ttgir_warpgroup_dots(compiled.asm["ttgir"])
    result = KernelResult(
        job=job,
        registers=usage["registers"],
        spill_bytes=usage["stack"] + usage["local"],
        spill_instructions=len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass)),
        shared_bytes=int(compiled.metadata.shared),
        hgmma_instructions=len(re.findall(r"\bHGMMA\.", sass)),
        dots=dots,
        warpgroup_dots=wgmma,
        plain_dots=plain_dots,
        redundant_warpgroup_dots=redundant,
        compile_seconds=seconds,
    )
    result.problems = find_problems(result)
    return result


def find_problems(result: KernelResult) -> list[str]:
    """Why a configuration is not fit for sm_90 (empty when it is)."""
    problems = []
    if result.spill_bytes or result.spill_instructions:
        problems.append(f"spills ({result.spill_bytes} B stack per thread, {result.spill_instructions} LDL/STL)")
    if result.shared_bytes > SM90_MAX_SMEM_PER_BLOCK:
        problems.append(f"shared memory {result.shared_bytes} B > {SM90_MAX_SMEM_PER_BLOCK} B")
    allowed = sum(d.mmav3_allowed for d in result.dots)
    if allowed == len(result.dots) > 0 and (result.plain_dots or not result.hgmma):
        problems.append(f"{result.plain_dots} of {len(result.dots)} dots miss HGMMA although their shapes allow it")
    elif allowed == 0 and (result.warpgroup_dots or result.hgmma):
        problems.append("HGMMA where the MMAv3 rule of this report expects none: the rule is out of date")
    elif 0 < allowed < len(result.dots) and not (result.warpgroup_dots and result.plain_dots and result.hgmma):
        problems.append(f"expected HGMMA for {allowed} of {len(result.dots)} dots, got {result.warpgroup_dots}")
    if result.redundant_warpgroup_dots:
        problems.append(f"{result.redundant_warpgroup_dots} dots repeat rows across warpgroups "
                        f"(tile rows < 16 x {result.job.num_warps} warps)")
    return problems


def run_jobs(jobs: Sequence, workers: int, on_result: Callable[[int, object], None] | None = None,
             compile_fn: Callable = compile_and_inspect) -> list:
    """Compile all jobs with ``compile_fn``, ``workers`` processes at a time; results in job order.

    ``on_result(index, result)`` is called as each result arrives (in order).
    """
    import multiprocessing

    results = []
    with ProcessPoolExecutor(max_workers=max(workers, 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        for index, result in enumerate(pool.map(compile_fn, jobs)):
            results.append(result)
            if on_result is not None:
                on_result(index, result)
    return results


# --------------------------------------------------------------------------------------
# The fused loss kernels (crossmae_kernels.packed_mse)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossJob:
    """One loss-kernel compilation: a kernel at one pred dtype and column block."""

    kernel: str
    dtype: str
    block_r: int
    block_c: int
    num_warps: int = 4  # Triton's defaults: the launchers pass neither
    num_stages: int = 3


def build_loss_jobs(kernels: Iterable[str] = LOSS_KERNELS, dtypes: Iterable[str] = LOSS_DTYPES,
                    block_cs: Iterable[int] = LOSS_BLOCK_CS) -> list[LossJob]:
    from crossmae_kernels import packed_mse

    jobs = []
    for kernel in kernels:
        if kernel not in _LOSS_SOURCES:
            raise ValueError(f"unknown loss kernel {kernel!r}, expected one of {LOSS_KERNELS}")
        for dtype in dtypes:
            if dtype not in LOSS_DTYPES:
                raise ValueError(f"loss dtype must be one of {LOSS_DTYPES}, got {dtype!r}")
            for block_c in block_cs:
                if block_c not in LOSS_BLOCK_CS:
                    raise ValueError(f"BLOCK_C must be one of {LOSS_BLOCK_CS}, got {block_c}")
                jobs.append(LossJob(kernel, dtype, packed_mse.block_rows(block_c), block_c))
    return jobs


def make_loss_source(job: LossJob):
    """The ASTSource the JIT would build for a loss-kernel job (see the module docstring)."""
    from triton.compiler import ASTSource

    from crossmae_kernels import packed_mse

    fn = getattr(packed_mse, _LOSS_SOURCES[job.kernel])
    pointer_types = {"Pred": f"*{job.dtype}", "Grad": f"*{job.dtype}", "Target": "*fp32", "Weight": "*fp32",
                     "Partial": "*fp32", "GradOut": "*fp32"}
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int], list] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if name in ("BLOCK_R", "BLOCK_C"):
            signature[name] = "constexpr"
            constexprs[name] = job.block_r if name == "BLOCK_R" else job.block_c
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(index,)] = _ALIGNED
        elif name in ("n_rows", "n_cols") or name.startswith("stride_"):
            signature[name] = "i32"
        else:
            raise ValueError(f"{fn.__name__}: don't know how the launcher passes parameter {name!r}")
    return ASTSource(fn, signature, constexprs, attrs)


def compile_and_inspect_loss(job: LossJob) -> dict:
    """Compile one loss-kernel job for sm_90; its report row (registers, spills, shared memory, ok)."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = find_tools()
    options = {"num_warps": job.num_warps, "num_stages": job.num_stages,
               "enable_fp_fusion": triton.knobs.language.default_fp_fusion}
    start = time.perf_counter()
    compiled = triton.compile(make_loss_source(job), target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)
    seconds = time.perf_counter() - start
    usage, sass = cubin_resources(compiled.asm["cubin"], tools["cuobjdump"])
    row = {
        **dataclasses.asdict(job),
        "registers": usage["registers"],
        "spill_bytes": usage["stack"] + usage["local"],
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass)),
        "shared_bytes": int(compiled.metadata.shared),
        "dots": compiled.asm["ttir"].count("tt.dot "),
        "compile_seconds": round(seconds, 2),
    }
    problems = []
    if row["spill_bytes"] or row["spill_instructions"]:
        problems.append(f"spills ({row['spill_bytes']} B stack per thread, {row['spill_instructions']} LDL/STL)")
    if row["shared_bytes"] > SM90_MAX_SMEM_PER_BLOCK:
        problems.append(f"shared memory {row['shared_bytes']} B > {SM90_MAX_SMEM_PER_BLOCK} B")
    if row["dots"]:
        problems.append(f"{row['dots']} tl.dot in a kernel this report treats as dot-free: extend the report")
    row.update(ok=not problems, problems=problems)
    return row


LOSS_COLUMNS = [
    ("kernel", "kernel"), ("dtype", "pred dtype"), ("block_r", "BLOCK_R"), ("block_c", "BLOCK_C"),
    ("num_warps", "warps"), ("num_stages", "stages"), ("registers", "regs"), ("spill_bytes", "spill B"),
    ("shared_bytes", "smem B"), ("ok", "ok"),
]


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
COLUMNS = [
    ("kernel", "kernel"), ("dtype", "dtype"), ("head_dim", "D"), ("block_m", "BLOCK_M"), ("block_n", "BLOCK_N"),
    ("num_warps", "warps"), ("num_stages", "stages"), ("registers", "regs"), ("spill_bytes", "spill B"),
    ("shared_bytes", "smem B"), ("hgmma", "HGMMA"), ("expected_hgmma", "expect"), ("ok", "ok"),
]


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict], markdown: bool = False, columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    header = [title for _, title in columns]
    body = [[_cell(row[key]) for key, _ in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def summarise(rows: Sequence[dict], pruned: Sequence[dict]) -> list[dict]:
    """Per kernel, dtype and head dim: configurations kept and pruned, register and shared-memory ranges."""
    summary = []
    for kernel in KERNELS:
        for dtype in DTYPES:
            for head_dim in sorted({r["head_dim"] for r in rows}):
                key = (kernel, dtype, head_dim)
                group = [r for r in rows if _group_key(r) == key and r["autotuned"]]
                if not group:
                    continue
                summary.append({
                    "kernel": kernel, "dtype": dtype, "head_dim": head_dim, "configs": len(group),
                    "pruned": sum(_group_key(p) == key for p in pruned),
                    "registers": _span(r["registers"] for r in group),
                    "max_spill_bytes": max(r["spill_bytes"] for r in group),
                    "shared_bytes": _span(r["shared_bytes"] for r in group),
                    "hgmma": f"{sum(r['hgmma'] for r in group)}/{len(group)}",
                    "not_ok": sum(not r["ok"] for r in group),
                })
    return summary


def _group_key(row: dict) -> tuple[str, str, int]:
    return row["kernel"], row["dtype"], row["head_dim"]


def _span(values: Iterable[int]) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def environment(command: str, tools: dict[str, str], seconds: float, cpu_seconds: float, workers: int,
                load_average: float) -> dict:
    import torch
    import triton

    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()} ({platform.machine()}, {os.cpu_count()} CPUs), no GPU: "
                   f"compile-only for sm_{TARGET_ARCH}",
        "target": f"GPUTarget('cuda', {TARGET_ARCH}, 32)",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ptxas": tool_version(tools["ptxas"]),
        "cuobjdump": tool_version(tools["cuobjdump"]),
        "git_sha": _git_sha(),
        "workers": workers,
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "load_average_at_start": round(load_average, 1),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_sha() -> str:
    """HEAD's short sha, marked when a kernel source of the report differs from it."""
    from crossmae_kernels import packed_mse

    kernel_files = [Path(m.__file__).resolve() for m in (_kernel_module(), packed_mse)]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=kernel_files[0].parent).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = [f.name for f in kernel_files if git("status", "--porcelain", "--", str(f))]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} + uncommitted changes to {', '.join(dirty)}" if dirty else sha


def render_markdown(env: dict, rows: Sequence[dict], pruned: Sequence[dict],
                    loss_rows: Sequence[dict] = ()) -> str:
    autotuned = [r for r in rows if r["autotuned"]]
    bad = [r for r in autotuned if not r["ok"]]
    loss_bad = [r for r in loss_rows if not r["ok"]]
    lines = [
        "# Static sm_90 kernel report (compile-only, no GPU)",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}",
        f"- machine: {env['machine']}",
        f"- target: {env['target']}; triton {env['triton']}, ptxas {env['ptxas']}, cuobjdump {env['cuobjdump']}, "
        f"torch {env['torch']}, python {env['python']}; git {env['git_sha']}",
        f"- time: {env['wall_seconds']} s wall with {env['workers']} compile processes, {env['cpu_seconds']} s CPU "
        f"(compiles, ptxas and cuobjdump; a warm Triton cache skips the compiles); 1-minute load average "
        f"{env['load_average_at_start']} at the start",
        "",
        "Every Triton kernel in `crossmae_kernels.varlen_attention`, compiled ahead of time for Hopper, for every",
        "configuration the autotuner may pick (`prune_configs`), head dims 16/32/64/128, bf16 and fp16; and the",
        "fused loss kernels of `crossmae_kernels.packed_mse` (no `tl.dot`: spills and shared memory only).",
        "Method and rules: the docstring of `bench/kernel_report.py`. In short:",
        "",
        "- Specialisation as at run time: last-dim strides are 1 (specialised to the constant 1, as Triton's JIT",
        "  does), tensors 16-byte aligned, token/head strides multiples of 16; DOT_PRECISION=\"ieee\".",
        "- regs: registers per thread (cuobjdump `REG`); spill B: stack frame + local memory per thread",
        "  (cuobjdump `STACK` + `LOCAL`: where ptxas puts spilled registers; the kernels have no local arrays or",
        "  calls; LDL/STL in the SASS are checked too); smem B: Triton's dynamic shared memory per block",
        "  (`metadata.shared`, limit 227 KiB).",
        "- HGMMA: warpgroup MMA instructions in the SASS. expect: the `tl.dot`s pass Triton's MMAv3 rule",
        "  (16-bit inputs, num_warps % 4 == 0, M % 64 == 0, N % 8 == 0, K >= 16), so HGMMA must be there.",
        "- ok: no spills, shared memory fits, HGMMA exactly where expected, and no dot whose tile has fewer rows",
        "  than 16 x num_warps (Triton puts all warps of a chained dot along M, so extra warpgroups would repeat",
        "  the same rows).",
        "",
        f"**{len(autotuned) - len(bad)} of {len(autotuned)} autotuner configurations are ok.**"
        + (f" **{len(loss_rows) - len(loss_bad)} of {len(loss_rows)} loss kernel jobs are ok.**" if loss_rows else ""),
        "",
        "## Summary (autotuner configurations)",
        "",
        "| kernel | dtype | D | configs | pruned | regs | max spill B | smem B | HGMMA | not ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summarise(rows, pruned):
        lines.append(f"| {s['kernel']} | {s['dtype']} | {s['head_dim']} | {s['configs']} | {s['pruned']} "
                     f"| {s['registers']} | {s['max_spill_bytes']} | {s['shared_bytes']} | {s['hgmma']} "
                     f"| {s['not_ok']} |")
    if bad:
        lines += ["", "## Problems", ""]
        lines += [f"- {_label(r)}: {'; '.join(r['problems'])}" for r in bad]
    if loss_rows:
        lines += ["", "## Fused loss kernels (`crossmae_kernels.packed_mse`)", "",
                  "BLOCK_C columns per slice (the launcher picks the smallest power of two >= the column count, "
                  "16 to 128) and BLOCK_R rows per program (`block_rows`: 1024-element tiles); no `tl.dot`, so no "
                  "HGMMA.", "",
                  format_table(loss_rows, markdown=True, columns=LOSS_COLUMNS)]
        lines += [f"- {r['kernel']} {r['dtype']} BLOCK_C={r['block_c']}: {'; '.join(r['problems'])}"
                  for r in loss_bad]
    lines += ["", "## All autotuner configurations", "", format_table(autotuned, markdown=True)]
    extra = [r for r in rows if not r["autotuned"]]
    if extra:
        lines += ["", "## Configurations prune_configs drops (compiled with --all-configs, for information)", "",
                  format_table(extra, markdown=True)]
        lines += [f"- {_label(r)}: {'; '.join(r['problems'])}" for r in extra if r["problems"]]
    elif pruned:
        lines += ["", "## Configurations prune_configs drops (not compiled)", ""]
        lines += [f"- {_label(p)}" for p in pruned]
    return "\n".join(lines) + "\n"


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (workers, ptxas, cuobjdump)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _label(row: dict) -> str:
    return (f"{row['kernel']} {row['dtype']} D={row['head_dim']} BLOCK_M={row['block_m']} "
            f"BLOCK_N={_cell(row['block_n'])} warps={row['num_warps']} stages={row['num_stages']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    parser.add_argument("--all-configs", action="store_true",
                        help="also compile the configurations prune_configs drops (reported, never failing)")
    parser.add_argument("--loss-dtypes", nargs="+", default=list(LOSS_DTYPES), choices=LOSS_DTYPES,
                        help="pred dtypes of the loss-kernel jobs")
    parser.add_argument("--loss-block-cs", nargs="+", type=int, default=list(LOSS_BLOCK_CS), choices=LOSS_BLOCK_CS,
                        help="BLOCK_C values of the loss-kernel jobs")
    parser.add_argument("--no-loss", action="store_true", help="leave out the fused loss kernels")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"where {REPORT_NAME}.md and {REPORT_NAME}.json go")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: TRITON_INTERPRET=1 replaces the kernels by interpreted functions; unset it to compile",
              file=sys.stderr)
        return 2
    try:
        tools = find_tools()
    except ToolMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python bench/kernel_report.py" + ("" if argv is None and len(sys.argv) <= 1
                                                  else " " + " ".join(sys.argv[1:] if argv is None else argv))
    jobs = build_jobs(args.kernels, args.dtypes, args.head_dims, args.all_configs)
    print(f"compiling {len(jobs)} kernels for sm_{TARGET_ARCH} with {args.jobs} processes ...", flush=True)

    def progress(index: int, result: KernelResult) -> None:
        print(f"[{index + 1}/{len(jobs)}] {_label(dataclasses.asdict(result.job))}: {result.registers} regs, "
              f"{result.compile_seconds:.1f} s", flush=True)

    load_average = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    results = run_jobs(jobs, args.jobs, progress)
    loss_jobs = [] if args.no_loss else build_loss_jobs(dtypes=args.loss_dtypes, block_cs=args.loss_block_cs)
    if loss_jobs:
        print(f"compiling {len(loss_jobs)} loss kernels ...", flush=True)
    loss_rows = run_jobs(loss_jobs, args.jobs, compile_fn=compile_and_inspect_loss) if loss_jobs else []
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    rows = [r.row() for r in results]
    pruned = pruned_configs(args.kernels, args.dtypes, args.head_dims)
    env = environment(command, tools, seconds, cpu_seconds, args.jobs, load_average)

    print(format_table(rows, columns=[*COLUMNS[:7], ("autotuned", "tuned"), *COLUMNS[7:]]))
    bad = [r for r in rows if r["autotuned"] and not r["ok"]]
    for row in bad:
        print(f"NOT OK {_label(row)}: {'; '.join(row['problems'])}")
    if loss_rows:
        print(format_table(loss_rows, columns=LOSS_COLUMNS))
    loss_bad = [r for r in loss_rows if not r["ok"]]
    for row in loss_bad:
        print(f"NOT OK {row['kernel']} {row['dtype']} BLOCK_C={row['block_c']}: {'; '.join(row['problems'])}")
    print(f"{len(rows) + len(loss_rows)} kernels in {seconds:.1f} s; {len(bad)} autotuner configurations and "
          f"{len(loss_bad)} loss kernel jobs not ok")
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = args.out_dir / f"{REPORT_NAME}.json"
        md_path = args.out_dir / f"{REPORT_NAME}.md"
        report = {"environment": env, "rows": rows, "pruned": pruned, "loss_rows": loss_rows}
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        md_path.write_text(render_markdown(env, rows, pruned, loss_rows))
        print(f"wrote {md_path} and {json_path}")
    return 1 if bad or loss_bad else 0


if __name__ == "__main__":
    sys.exit(main())

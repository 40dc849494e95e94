"""The one benchmark harness shared by every script in ``bench/``.

What it gives a benchmark script:

- :func:`measure` times a callable: CUDA events around each call on a GPU (after a
  synchronisation, warm-up excluded, L2 cache cleared between calls), ``time.perf_counter`` on a
  CPU; returns ms quantiles ``ms_p20``/``ms_p50``/``ms_p80``, the first call alone
  (``first_call_ms``: compilation and autotuning) and, with NVML, energy per call from
  :func:`measure_energy`: its own loop of ≥ 1 s of back-to-back calls, no L2 flushes between them.
- :func:`run_rounds` the one rounds loop of every benchmark: each row timed once per round
  (:class:`Measurement`, usually through :func:`time_row`), samples pooled over rounds, rows saved
  after each measurement; :func:`add_speedups` the ``speedup_vs_<baseline>`` columns.
- :func:`measure_peak_memory` the peak memory one call of the callable adds, in MB.
- :func:`matmul_peak` the machine's own matmul throughput, measured in the same run, so rows can
  report the fraction of it they reach.
- :func:`environment` the environment record: device, versions, git sha, host, date, and NVML
  telemetry when available; :func:`machine_summary` it in one line, :func:`command_line` the
  command that reproduces a run. Every report in ``bench/`` records these.
- :class:`BenchRun` the rows of one run plus its metadata, written to JSON and CSV (same stem);
  :func:`print_table` an aligned table; :func:`compare` the change of every matching row between
  two result files, non-zero past a threshold.
- argparse helpers (:func:`add_common_args`, :func:`parse_list`, :func:`parse_dtype`) whose
  errors name the bad flag; :func:`import_pyplot` matplotlib when installed (plots are optional).

Peak memory, precisely
    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the tensors of
    PyTorch's caching allocator. ``peak_mb`` is that peak minus what was allocated when the call
    began (the call's own working memory and outputs); ``peak_total_mb`` is the absolute peak,
    inputs included.
    On CPU (Linux): the resident set size. Freed heap memory is first handed back to the OS
    (``malloc_trim``), the kernel's high-water mark is reset (writing ``5`` to
    ``/proc/self/clear_refs``), one call runs, and ``peak_mb`` = ``VmHWM`` − ``VmRSS`` before the
    call: the peak resident memory the call added, counted in touched pages, for the whole process
    (all threads, any allocator). It includes the allocator's overhead, and leaves out pages
    allocated but never written.
    ``peak_total_mb`` is ``VmHWM`` itself (interpreter and libraries included). Elsewhere: None.

Command line (compare two result files, or print one)::

    python -m bench.harness compare OLD.json NEW.json --threshold 0.05
    python -m bench.harness show RESULTS.json --columns backend,pass,preset,ms_p50
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
GIT_SHA_ENV = "CROSSMAE_GIT_SHA"  # used when the tree is not a git checkout (e.g. a copied tree)

MIN_REPS = 5  # at least this many timed calls when the count comes from --min-time
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


# -- timing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Quantiles of the per-call times of :func:`measure`, in milliseconds.

    ``first_call_ms`` is the first warm-up call alone: compilation and autotuning included, timed
    on its own. ``joules`` (energy per call), ``power_w`` (mean power) and ``sm_clock_mhz`` (SM
    clock right after) come from NVML on a GPU, measured in their own loop of back-to-back calls
    (see :func:`measure_energy`), else None. ``samples_ms`` keeps every per-call time, so timings
    of several rounds can be merged.
    """

    ms_p20: float
    ms_p50: float
    ms_p80: float
    reps: int
    first_call_ms: float | None = None
    joules: float | None = None
    power_w: float | None = None
    sm_clock_mhz: int | None = None
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, times_ms: Sequence[float], **extra) -> Timing:
        q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
        return cls(float(q[0]), float(q[1]), float(q[2]), len(times_ms), samples_ms=tuple(times_ms), **extra)

    @classmethod
    def merge(cls, timings: Sequence[Timing]) -> Timing:
        """One timing from the samples of several (e.g. interleaved rounds); telemetry averaged,
        ``first_call_ms`` the first round's."""
        def mean(name):
            values = [getattr(t, name) for t in timings if getattr(t, name) is not None]
            return sum(values) / len(values) if values else None

        clock = mean("sm_clock_mhz")
        return cls.from_samples([s for t in timings for s in t.samples_ms], first_call_ms=timings[0].first_call_ms,
                                joules=mean("joules"), power_w=mean("power_w"),
                                sm_clock_mhz=round(clock) if clock is not None else None)

    def as_row(self) -> dict:
        """The fields a result row carries (the samples stay out)."""
        return {"reps": self.reps, "ms_p20": self.ms_p20, "ms_p50": self.ms_p50, "ms_p80": self.ms_p80,
                "first_call_ms": self.first_call_ms, "joules": self.joules, "power_w": self.power_w,
                "sm_clock_mhz": self.sm_clock_mhz}


@dataclass(frozen=True)
class Energy:
    """NVML energy over a loop of back-to-back calls: per call, mean power, and the loop itself."""

    joules: float
    power_w: float
    sm_clock_mhz: int | None
    calls: int
    seconds: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    warmup: int = 3,
    reps: int | None = None,
    min_time: float = 1.0,
    max_reps: int = 1000,
    clear_l2: bool = True,
    energy_time: float = 1.0,
) -> Timing:
    """Time ``fn()`` and return p20/p50/p80 in ms.

    Args:
        fn: the call to time, no arguments; its return value is dropped after each call.
        device: where ``fn`` runs. CUDA: each call sits between two CUDA events, the device is
            synchronised before the first and after the last, and the per-call times are the
            event intervals (launch overhead included, host gaps between calls not). CPU:
            ``time.perf_counter`` around each call.
        warmup: untimed calls first (compilation, autotuning, allocator growth); at least one is
            always made: it gives ``first_call_ms`` and the estimate of a call's time.
        reps: exact number of timed calls; None: as many as fit in ``min_time`` seconds
            (estimated from the last warm-up call), at least ``MIN_REPS``, at most ``max_reps``.
        min_time: seconds of timed calls to aim for when ``reps`` is None.
        clear_l2: on CUDA, overwrite a buffer twice the L2 size before each call (outside the
            events) so no call finds its inputs in the cache left by the previous one.
        energy_time: on CUDA with NVML, after the timed calls, seconds of back-to-back calls over
            which :func:`measure_energy` reads the energy counter (0: none).
    """
    device = torch.device(device)
    if reps is not None and reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if energy_time < 0:
        raise ValueError(f"energy_time must be non-negative, got {energy_time}")
    first = last = 0.0
    for i in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        last = time.perf_counter() - start
        if i == 0:
            first = last
    if reps is None:
        reps = int(min(max_reps, max(MIN_REPS, min_time / max(last, 1e-6))))

    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return Timing.from_samples(times, first_call_ms=first * 1e3)

    scratch = None
    if clear_l2:
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        scratch = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        if scratch is not None:
            scratch.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    del scratch
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    telemetry = {}
    energy = measure_energy(fn, device=device, seconds=energy_time, call_ms=sorted(times)[len(times) // 2])
    if energy is not None:
        telemetry = {"joules": energy.joules, "power_w": energy.power_w, "sm_clock_mhz": energy.sm_clock_mhz}
    return Timing.from_samples(times, first_call_ms=first * 1e3, **telemetry)


def measure_energy(fn: Callable[[], object], *, device: torch.device | str, seconds: float = 1.0,
                   call_ms: float | None = None) -> Energy | None:
    """Energy per call of ``fn()`` from NVML's counter, over at least ``seconds`` of back-to-back calls.

    The calls are queued without L2 flushes or host synchronisation between them, so the window
    holds the calls alone; NVML's counter ticks in mJ and updates every few ms, so the loop runs
    at least ``seconds`` (1 s by default) for a reading within a few percent. ``call_ms`` (a
    call's time) sizes the loop; without it one call is timed first. None on a CPU, without NVML,
    or with ``seconds`` = 0.
    """
    device = torch.device(device)
    nvml = Nvml.open(device)
    if nvml is None or seconds <= 0 or nvml.energy_mj() is None:
        return None
    if call_ms is None:
        start = time.perf_counter()
        fn()
        _synchronize(device)
        call_ms = (time.perf_counter() - start) * 1e3
    calls = max(1, math.ceil(seconds * 1e3 / max(call_ms, 1e-3)))
    done, wall = 0, 0.0
    _synchronize(device)
    energy_start, wall_start = nvml.energy_mj(), time.perf_counter()
    while wall < seconds:  # the estimate can be short: queue more until the window is long enough
        for _ in range(calls):
            fn()
        done += calls
        _synchronize(device)
        wall = time.perf_counter() - wall_start
    energy_end = nvml.energy_mj()
    if energy_start is None or energy_end is None:
        return None
    joules = (energy_end - energy_start) / 1e3
    return Energy(joules / done, joules / wall, nvml.sm_clock_mhz(), done, wall)


# -- memory ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory of one call, in MB (10^6 bytes); see the module docstring for the method."""

    peak_mb: float  # above what was in use when the call began
    peak_total_mb: float  # absolute
    method: str  # "cuda_allocator" or "rss_hwm"


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_status_kb(key: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _collect_garbage() -> None:
    """Free unreachable cycles made since the last full collection (a full one takes ~0.2 s under torch)."""
    gc.collect(1)


def _release_freed_heap() -> None:
    """Return freed heap memory to the OS (glibc), so it does not hide in the RSS baseline."""
    _collect_garbage()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def rss_peak_supported() -> bool:
    """True where the CPU method works: Linux with a writable ``/proc/self/clear_refs``."""
    if not (_PROC_STATUS.exists() and _PROC_CLEAR_REFS.exists()):
        return False
    try:
        _PROC_CLEAR_REFS.write_text("5")
        _proc_status_kb("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def measure_peak_memory(fn: Callable[[], object], *, device: torch.device | str) -> MemoryPeak | None:
    """Peak memory that one call of ``fn()`` adds on ``device``; None where it can't be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        _synchronize(device)
        _collect_garbage()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return MemoryPeak((peak - base) / 1e6, peak / 1e6, "cuda_allocator")
    if device.type != "cpu" or not rss_peak_supported():
        return None
    _release_freed_heap()
    _PROC_CLEAR_REFS.write_text("5")  # reset VmHWM to the current VmRSS
    base_kb = _proc_status_kb("VmRSS")
    result = fn()
    peak_kb = _proc_status_kb("VmHWM")
    del result
    return MemoryPeak((peak_kb - base_kb) * 1024 / 1e6, peak_kb * 1024 / 1e6, "rss_hwm")


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Memory a benchmark may still take: free device memory on CUDA, ``MemAvailable`` on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- matmul peak -------------------------------------------------------------------------
@dataclass(frozen=True)
class MatmulPeak:
    """Throughput of one large square ``torch.matmul`` (n × n by n × n, 2·n³ FLOPs) at its p50."""

    tflops: float
    dtype: str
    n: int
    ms_p50: float


def matmul_peak(
    device: torch.device | str, dtype: torch.dtype | None = None, n: int | None = None, *, min_time: float = 0.5
) -> MatmulPeak:
    """The machine's own matmul peak, measured now.

    Defaults: bf16 and n = 8192 on CUDA (the reference docs/presets.md asks for); on CPU the run's
    dtype (pass it; fp32 by default) and n = 2048, since a CPU has no fast bf16 path to compare
    against.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # [n, n]
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # [n, n]
    timing = measure(lambda: torch.matmul(a, b), device=device, warmup=2, min_time=min_time, clear_l2=False,
                     energy_time=0)
    return MatmulPeak(2.0 * n**3 / (timing.ms_p50 * 1e-3) / 1e12, dtype_name(dtype), n, timing.ms_p50)


# -- environment -------------------------------------------------------------------------
_NVML_OPENED: dict[torch.device, Nvml | None] = {}


class Nvml:
    """NVML telemetry for one CUDA device (``nvidia-ml-py``); :meth:`open` returns None without it."""

    def __init__(self, pynvml, handle):
        self._nvml = pynvml
        self._handle = handle

    @classmethod
    def open(cls, device: torch.device | str) -> Nvml | None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        if device not in _NVML_OPENED:
            _NVML_OPENED[device] = cls._open(device)
        return _NVML_OPENED[device]

    @classmethod
    def _open(cls, device: torch.device) -> Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # not installed, or no driver library
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = None
        try:  # match by UUID: NVML and CUDA may number devices differently
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                return None
        return cls(pynvml, handle)

    def _read(self, fn, *args):
        try:
            return fn(self._handle, *args)
        except Exception:  # a query this GPU or driver does not support
            return None

    def energy_mj(self) -> int | None:
        """Total energy since the driver loaded, in mJ (Volta and newer)."""
        return self._read(self._nvml.nvmlDeviceGetTotalEnergyConsumption)

    def sm_clock_mhz(self) -> int | None:
        return self._read(self._nvml.nvmlDeviceGetClockInfo, self._nvml.NVML_CLOCK_SM)

    def snapshot(self) -> dict:
        """Name, driver, clocks, power and energy now."""
        nv = self._nvml
        name = self._read(nv.nvmlDeviceGetName)
        power_mw = self._read(nv.nvmlDeviceGetPowerUsage)
        limit_mw = self._read(nv.nvmlDeviceGetEnforcedPowerLimit)
        energy = self.energy_mj()
        try:
            driver = nv.nvmlSystemGetDriverVersion()
        except Exception:
            driver = None
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "sm_clock_mhz": self.sm_clock_mhz(),
            "sm_clock_max_mhz": self._read(nv.nvmlDeviceGetMaxClockInfo, nv.NVML_CLOCK_SM),
            "power_w": power_mw / 1e3 if power_mw is not None else None,
            "power_limit_w": limit_mw / 1e3 if limit_mw is not None else None,
            "temperature_c": self._read(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
            "energy_j": energy / 1e3 if energy is not None else None,
        }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> tuple[str, bool | None]:
    """(sha, dirty) of the checkout holding this file; ``$CROSSMAE_GIT_SHA`` or "unknown" outside git."""
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout

        sha = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(GIT_SHA_ENV, "unknown"), None


def device_label(device: torch.device | str) -> str:
    """A short file-name tag: ``cpu``, or the GPU's name (``h200`` for "NVIDIA H200")."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "cuda"


def environment(device: torch.device | str) -> dict:
    """Where and with what a run happens: device, versions, git, host, date, NVML telemetry."""
    device = torch.device(device)
    sha, dirty = git_state()
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "git_sha": sha,
        "git_dirty": dirty,
        "nvml": None,
    }
    nvml = Nvml.open(device)
    if nvml is not None:
        env["nvml"] = nvml.snapshot()
    return env


def command_line(program: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run: ``program`` then the arguments, quoted for a shell."""
    return " ".join([program, *map(shlex.quote, argv)])


def machine_summary(env: dict) -> str:
    """One line for a report: device, CPUs, versions and git state of an :func:`environment` record."""
    gpu = env["device_name"] if env["device"] == "cuda" else "no GPU"
    dirty = " (modified)" if env.get("git_dirty") else ""
    return (f"{env['cpu_model']}, {env['cpu_count']} CPUs, {gpu}; Python {env['python']}, torch {env['torch']}, "
            f"triton {env['triton']}; git {str(env['git_sha'])[:12]}{dirty}; {env['date']}")


# -- rows and result files ---------------------------------------------------------------
ROW_CONTEXT_KEYS = ("device", "device_name", "torch", "triton", "python", "git_sha", "git_dirty")


@dataclass
class BenchRun:
    """One benchmark run: its environment, the matmul peak measured in it, and its rows.

    Attributes:
        bench: the script's name (``attention_speed``).
        device: where it runs.
        env: :func:`environment` at the start.
        peak: :func:`matmul_peak` measured at the start.
        command: the command line that reproduces the run.
        key_fields: the row fields that identify a measurement across runs (for :func:`compare`).
        rows: one dict per measurement; :meth:`add` appends.
        metric: the row field holding the median time, which :func:`compare` reads by default.
    """

    bench: str
    device: torch.device
    env: dict
    peak: MatmulPeak
    command: str
    key_fields: tuple[str, ...]
    rows: list[dict] = field(default_factory=list)
    metric: str = "ms_p50"

    @classmethod
    def start(
        cls, bench: str, device: torch.device | str, *, key_fields: Sequence[str], argv: Sequence[str],
        peak_dtype: torch.dtype | None = None, peak_size: int | None = None, program: str | None = None,
        metric: str = "ms_p50",
    ) -> BenchRun:
        """Record the environment and measure the matmul peak; ``program`` is how the command
        line starts (default ``python -m bench.<bench>``)."""
        device = torch.device(device)
        command = command_line(program or f"python -m bench.{bench}", argv)
        return cls(bench, device, environment(device), matmul_peak(device, peak_dtype, peak_size), command,
                   tuple(key_fields), metric=metric)

    def add(self, **fields) -> dict:
        """Append a row: ``fields`` then the run's device, versions and git sha."""
        row = {**fields, **{k: self.env[k] for k in ROW_CONTEXT_KEYS}}
        self.rows.append(row)
        return row

    def throughput(self, flops: float, timing: Timing) -> dict:
        """TFLOP/s at the median time and its fraction of this run's matmul peak."""
        tflops = flops / (timing.ms_p50 * 1e-3) / 1e12
        return {"tflops": tflops, "peak_frac": tflops / self.peak.tflops}

    def metadata(self) -> dict:
        return {
            "bench": self.bench,
            "command": self.command,
            "key_fields": list(self.key_fields),
            "metric": self.metric,
            "matmul_peak": asdict(self.peak),
            "memory_method": "cuda_allocator" if self.device.type == "cuda" else "rss_hwm",
            **self.env,
            "load_avg_1m_at_save": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }

    def save(self, stem: Path | str) -> tuple[Path, Path]:
        """Write ``<stem>.json`` ({"metadata", "rows"}) and ``<stem>.csv`` (the rows)."""
        return write_results(self.rows, stem, self.metadata())


def run_logged(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` from the repository root with its output in ``log_path``; its wall seconds.

    Prints the command and the time; a failure ends the script with the log's last 20 lines."""
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise SystemExit(f"command failed (exit {proc.returncode}), log {log_path}:\n" + "\n".join(tail))
    seconds = time.perf_counter() - start
    print(f"  done in {seconds:.0f} s (log {log_path})", flush=True)
    return seconds


def record_error(row: dict, exc: BaseException, label: str) -> None:
    """Mark ``row`` as failed with the exception's type and first line, and say so on stderr.

    A benchmark records a variant or backend that breaks and goes on with the rest of the run."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    row.update(status="error", reason=f"{type(exc).__name__}: {message}")
    print(f"  {label}: {row['reason']}", file=sys.stderr)


# -- timing rows: one call per row, rounds interleaved -----------------------------------
def timing_kwargs(args: argparse.Namespace) -> dict:
    """The :func:`measure` settings of :func:`add_common_args`' flags."""
    return {"warmup": args.warmup, "reps": args.reps, "min_time": args.min_time, "energy_time": args.energy_time}


def time_row(run: BenchRun, row: dict, call: Callable[[], object], args: argparse.Namespace, *, first: bool,
             label: str, before: Callable[[], None] | None = None) -> Timing | None:
    """Time ``call`` for one row; in the first round also its peak memory (``peak_mb``, ``peak_total_mb``).

    ``before`` runs first in the first round (e.g. a first step whose loss the row keeps). An
    exception marks the row an error (:func:`record_error`) and returns None: a broken backend must
    not end the run.
    """
    try:
        if first and before is not None:
            before()
        timing = measure(call, device=run.device, **timing_kwargs(args))
        memory = measure_peak_memory(call, device=run.device) if first else None
    except Exception as exc:
        record_error(row, exc, label)
        return None
    finally:
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    if memory is not None:
        row.update(peak_mb=memory.peak_mb, peak_total_mb=memory.peak_total_mb)
    return timing


@dataclass
class Measurement:
    """One row of a run and how to time it.

    Attributes:
        row: the row in ``BenchRun.rows``; only rows with ``status == "ok"`` are timed.
        time: ``time(first_round)`` → a :class:`Timing`, or None when it failed (the row marked).
        label: how the progress line names the row.
    """

    row: dict
    time: Callable[[bool], Timing | None]
    label: str


def run_rounds(run: BenchRun, measurements: Sequence[Measurement], *, rounds: int, out: Path | str,
               fill: Callable[[dict, Timing], None] | None = None,
               derive: Callable[[Sequence[dict]], None] | None = None) -> None:
    """Time every measurement ``rounds`` times, interleaved, and keep the rows up to date.

    Each round measures every row once, in the given order, so on a shared machine every row sees
    the same conditions. After each measurement the row gets the merged timing of its rounds so
    far (``fill(row, timing)``; default: :meth:`Timing.as_row`), ``derive(run.rows)`` recomputes
    what rows derive from each other (speedups), a progress line is printed, and the run is saved
    to ``out``: a run cut short keeps what it measured.
    """
    done: list[list[Timing]] = [[] for _ in measurements]
    for round_ in range(rounds):
        for m, timings in zip(measurements, done, strict=True):
            if m.row.get("status", "ok") != "ok":
                continue
            timing = m.time(round_ == 0)
            if timing is None:
                continue
            timings.append(timing)
            merged = Timing.merge(timings)
            if fill is None:
                m.row.update(merged.as_row())
            else:
                fill(m.row, merged)
            if derive is not None:
                derive(run.rows)
            first_call = (f"  first call {format_value(timing.first_call_ms)} ms"
                          if round_ == 0 and timing.first_call_ms is not None else "")
            print(f"  {m.label:<36} p50 {format_value(timing.ms_p50):>8} ms{first_call}"
                  + (f"  (round {round_ + 1} of {rounds})" if rounds > 1 else ""), flush=True)
            run.save(out)


def add_speedups(rows: Sequence[dict], field: str, baselines: Sequence[str], same: Sequence[str]) -> None:
    """Set ``speedup_vs_<baseline>`` = the baseline row's ``ms_p50`` / this row's, on every timed row.

    The baseline row of a row is the one whose ``field`` is ``baseline`` and that agrees with it on
    every field of ``same`` (preset, shape, dtype ...); None where there is none.
    """
    timed = [r for r in rows if r.get("status", "ok") == "ok" and r.get("ms_p50") is not None]
    for baseline in baselines:
        ref = {tuple(r.get(k) for k in same): r["ms_p50"] for r in timed if r.get(field) == baseline}
        for row in timed:
            key = tuple(row.get(k) for k in same)
            row[f"speedup_vs_{baseline}"] = ref[key] / row["ms_p50"] if key in ref else None


def write_results(rows: Sequence[dict], stem: Path | str, metadata: dict) -> tuple[Path, Path]:
    """Write rows to ``<stem>.json`` (with metadata) and ``<stem>.csv``; returns both paths."""
    stem = Path(stem)
    if stem.suffix in (".json", ".csv"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps({"metadata": metadata, "rows": list(rows)}, indent=1) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def read_results(path: Path | str) -> tuple[dict, list[dict]]:
    """(metadata, rows) of a JSON file written by :func:`write_results`."""
    data = json.loads(Path(path).read_text())
    return data.get("metadata", {}), data["rows"]


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.1 or magnitude == 0:
            return f"{value:.2f}"
        return f"{value:.2g}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str | tuple[str, str]], file=None) -> None:
    """Print ``rows`` as an aligned table; a column is a row key or a (header, key) pair.

    Numbers are right-aligned, text left-aligned; the last column is never padded.
    """
    columns = [(c, c) if isinstance(c, str) else c for c in columns]
    cells = [[format_value(row.get(key)) for _, key in columns] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (header, _) in enumerate(columns)]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
               for _, key in columns]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = file or sys.stdout
    print(line([h for h, _ in columns]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print(line(r), file=out)


def compare(
    old_json: Path | str,
    new_json: Path | str,
    threshold: float = 0.05,
    *,
    metric: str | None = None,
    key_fields: Sequence[str] | None = None,
    file=None,
) -> int:
    """Print the change of ``metric`` for every row present in both files; 1 if any got slower past ``threshold``.

    Rows match on ``key_fields`` (default: the new file's ``metadata["key_fields"]``, else the
    old file's). Only rows with a number for ``metric`` in both files are compared; rows found in
    one file only are listed. ``metric`` is a time (lower is better; default: the files'
    ``metadata["metric"]``, else ``ms_p50``): a row regresses when ``new > old * (1 + threshold)``.
    Returns 0 when nothing regressed, 1 otherwise.
    """
    out = file or sys.stdout
    old_meta, old_rows = read_results(old_json)
    new_meta, new_rows = read_results(new_json)
    metric = metric or new_meta.get("metric") or old_meta.get("metric") or "ms_p50"
    keys = tuple(key_fields or new_meta.get("key_fields") or old_meta.get("key_fields") or ())
    if not keys:
        raise ValueError("key_fields: neither file names its key fields; pass key_fields=")

    def index(rows):
        return {tuple(row.get(k) for k in keys): row for row in rows if isinstance(row.get(metric), (int, float))}

    old, new = index(old_rows), index(new_rows)
    table, regressed = [], 0
    for key in new:
        if key not in old:
            continue
        before, after = old[key][metric], new[key][metric]
        change = after / before - 1.0 if before else float("inf")
        verdict = "slower" if change > threshold else "faster" if change < -threshold else "same"
        regressed += verdict == "slower"
        table.append({**dict(zip(keys, key, strict=True)), f"old_{metric}": before, f"new_{metric}": after,
                      "change_%": 100.0 * change, "verdict": verdict})
    print(f"compare {metric}: {old_json} ({old_meta.get('git_sha', '?')[:12]}) -> "
          f"{new_json} ({new_meta.get('git_sha', '?')[:12]}), threshold {threshold:.0%}", file=out)
    if table:
        print_table(table, [*keys, f"old_{metric}", f"new_{metric}", "change_%", "verdict"], file=out)
    for name, only in (("old", old.keys() - new.keys()), ("new", new.keys() - old.keys())):
        for key in sorted(only, key=str):
            print(f"only in {name}: " + ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True)), file=out)
    print(f"{len(table)} rows compared, {regressed} slower by more than {threshold:.0%}", file=out)
    return 1 if regressed else 0


# -- plots -------------------------------------------------------------------------------
def import_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None (with a message) when
    matplotlib is not installed: plots are optional, the numbers are in the JSON and CSV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


# -- command-line helpers ----------------------------------------------------------------
def parse_list(text: str, choices: Iterable[str], flag: str) -> list[str]:
    """Split a comma-separated flag value and check every item; the error names the flag."""
    choices = list(choices)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{flag} must name at least one of {', '.join(choices)}")
    bad = [item for item in items if item not in choices]
    if bad:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))


def parse_dtype(text: str, flag: str = "--dtype") -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise ValueError(f"{flag} must be one of {', '.join(DTYPES)}, got {text!r}") from None


def resolve_device(text: str | None, flag: str = "--device") -> torch.device:
    """``None`` → cuda if available, else cpu; a named CUDA device must exist."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{flag} must be cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag}={text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} must be cpu, cuda or cuda:N, got {text!r}")
    return device


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark script shares: device, timing, output, comparison."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per measurement (default: as many as fit in --min-time)")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds of timed calls per measurement when --reps is not given (default 1.0)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement (default 3)")
    parser.add_argument("--energy-time", type=float, default=1.0,
                        help="seconds of back-to-back calls over which NVML's energy is read, on a GPU, after each "
                             "measurement (0: none; default 1.0)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the sweep N times, interleaving the measurements, and pool each row's samples "
                             "(steadier ratios on a shared machine; default 1)")
    parser.add_argument("--out", default=None,
                        help="path stem of the results: writes STEM.json and STEM.csv (default under bench/results/)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (torch.set_num_threads; default: torch's own choice)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="side n of the n×n matmul that measures the machine's peak (default 8192 GPU, 2048 CPU)")
    parser.add_argument("--compare", default=None, metavar="OLD.json",
                        help="after the run, compare with this earlier result file; exit 1 past --threshold")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="relative slowdown that --compare calls a regression (default 0.05)")


def apply_common_args(args: argparse.Namespace) -> None:
    """Check :func:`add_common_args`' flags (errors name the flag) and apply ``--threads``."""
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {args.reps}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    if args.min_time <= 0:
        raise ValueError(f"--min-time must be positive, got {args.min_time}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    if args.energy_time < 0:
        raise ValueError(f"--energy-time must be non-negative, got {args.energy_time}")
    if args.peak_size is not None and args.peak_size < 16:
        raise ValueError(f"--peak-size must be at least 16, got {args.peak_size}")
    if args.threshold < 0:
        raise ValueError(f"--threshold must be non-negative, got {args.threshold}")
    if args.compare is not None and not Path(args.compare).is_file():
        raise ValueError(f"--compare: no such file {args.compare!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_compare = sub.add_parser("compare", help="change of every matching row between two result files")
    p_compare.add_argument("old", help="earlier result JSON")
    p_compare.add_argument("new", help="later result JSON")
    p_compare.add_argument("--threshold", type=float, default=0.05, help="relative slowdown that fails (0.05)")
    p_compare.add_argument("--metric", default=None,
                           help="row field to compare, lower is better (default: the files' own, else ms_p50)")
    p_show = sub.add_parser("show", help="print the rows of a result file as a table")
    p_show.add_argument("file", help="result JSON")
    p_show.add_argument("--columns", default=None, help="comma-separated row fields (default: all)")
    p_show.add_argument("--status", default="ok", help="only rows with this status; 'all' for every row (ok)")
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare(args.old, args.new, args.threshold, metric=args.metric)
    meta, rows = read_results(args.file)
    if args.status != "all":
        rows = [r for r in rows if r.get("status", "ok") == args.status]
    columns = args.columns.split(",") if args.columns else list(dict.fromkeys(k for r in rows for k in r))
    print(f"{args.file}: {meta.get('command', '')}  [{meta.get('device_name', '?')}, {meta.get('date', '?')}]")
    print_table(rows, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())

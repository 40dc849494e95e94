#!/usr/bin/env bash
# GPU check: one prepared script for a machine with a CUDA GPU, run from the source tree (no install).
#
#   bash bench/gpu_check.sh [STAGE ...]          default: every stage but ragged and sweep, in this order
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  print every stage's command and time budget, plan the GPU
#                                                tests (Triton compiles they trigger; no GPU needed), exit
#
# First, always: environment.txt (date, host, nvidia-smi, C compiler, Python headers, versions), written
# before anything can fail; then the imports of crossmae.model, crossmae.engine and bench.decoder_speed.
# Triton builds a small C launcher for every kernel at run time: without a C compiler (and Python's
# headers) the triton backend can't run, and the check says so at the top.
# Stages, ordered so that the first five minutes give the headline rows (budget in seconds):
#   setup      15  environment.txt and the imports (always first)
#   attention  70  varlen attention alone, seed and wide, bf16, fwd+bwd: torch_varlen, triton (and loop for
#                  the ratio); each row's first_call_ms is its compile + autotuning, timed on its own
#   decoder    70  the headline: one decoder training step at seed, every variant
#   tests      90  the GPU tests, one Triton config per kernel (python -m bench.gpu_test_plan --run)
#   step       40  the GPU tests of the training step and its data: CUDA graphs replayed across bucketed
#                  lengths, the device-resident data path against the host's, a step under
#                  torch.cuda.set_sync_debug_mode("error") (tests/test_buckets.py, test_device_data.py,
#                  test_train_step_sync.py, marker gpu)
#   data       25  the data path at seed: __getitem__ + collate, the device-resident path on cuda, the loader
#                  with 0 and 4 workers (bench/data_speed.py)
#   wide       40  the decoder step at wide
#   kernels    25  attention fwd and bwd apart, and the other backends, at seed and wide
#   train      45  the whole training step, default and seed presets
#   ragged     60  (only when named) the decoder step at ragged
#   sweep     150  (only when named) the decoder batch sweep B = 1..64 at seed
#   regional   90  (only when named) the decoder step at regional: a whole region per sample, 3 grids and
#                  76 groups of 8 gauges (docs/sites.md)
#   regional_train 120  (only when named) the whole training step at regional, fused and the seed's path
# A stage gets at most its budget and what is left of $GPU_CHECK_BUDGET (default: the default stages'
# sum, 420 s), and is skipped under 20 s. Every benchmark saves its rows after each measurement, so a
# stage cut short keeps what it measured.
#
# With $OUT set, everything lands there: environment.txt, one .log per stage, pytest_gpu.xml, and the
# benchmarks' <name>_gpu.json/.csv(/.png); without it the benchmarks write bench/results/<name>_<gpu>.*
# and the logs go to a temporary folder. Exit status: 0 when every stage that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# Triton's autotuning results are cached on disk: the attention stage tunes (its first_call_ms), later
# stages reuse what it found
export TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == "" ]] && DRY_RUN=0 || DRY_RUN=1
MAX_TOTAL=420  # seconds: the default stages' budgets must fit in this

DEFAULT_STAGES=(attention decoder tests step data wide kernels train)
declare -A BUDGET=([setup]=15 [attention]=70 [decoder]=70 [tests]=90 [step]=40 [data]=25 [wide]=40 [kernels]=25 [train]=45
                  [ragged]=60 [sweep]=150 [regional]=90 [regional_train]=120)
STAGES=("$@")
(( ${#STAGES[@]} == 0 )) && STAGES=("${DEFAULT_STAGES[@]}")
for stage in "${STAGES[@]}"; do
    [[ -n "${BUDGET[$stage]:-}" && "$stage" != setup ]] || { echo "unknown stage $stage"; exit 2; }
done
default_total=${BUDGET[setup]}
for stage in "${DEFAULT_STAGES[@]}"; do default_total=$(( default_total + BUDGET[$stage] )); done
TOTAL_BUDGET="${GPU_CHECK_BUDGET:-$default_total}"

if [[ -n "${OUT:-}" ]]; then LOGS="$OUT"
elif (( DRY_RUN )); then LOGS="<temporary folder>"
else LOGS="$(mktemp -d)"; fi
START=$SECONDS

# -- the C compiler Triton builds its launchers with ($CC, else gcc, else clang), and Python's headers
CC_FOUND="${CC:-$(command -v gcc || command -v clang || command -v cc || true)}"
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
if [[ -n "$CC_FOUND" && -f "$PY_INCLUDE/Python.h" ]]; then
    COMPILER_LINE="C compiler for Triton's launchers: $CC_FOUND; Python headers: $PY_INCLUDE"
elif [[ -n "$CC_FOUND" ]]; then
    COMPILER_LINE="WARNING: no Python.h under '$PY_INCLUDE': Triton can't build its launchers, the triton backend will fail"
else
    COMPILER_LINE="WARNING: no C compiler (\$CC, gcc, clang, cc): Triton can't build its launchers, the triton backend will fail"
fi
echo "$COMPILER_LINE"

# -- where a benchmark writes: $OUT/<name>_gpu, or bench/results/<name>_<gpu label>
stem() {
    if [[ -n "${OUT:-}" ]]; then echo "$OUT/$1_gpu"; else echo "bench/results/$1_${GPU_LABEL:-gpu}"; fi
}
show() {  # a result file's rows as a table
    [[ -f "$1" ]] && "$PY" -m bench.harness show "$1" --columns "$2"
}
ATTN_COLUMNS=backend,pass,preset,D,ms_p50,first_call_ms,tflops,peak_frac,peak_mb,speedup_vs_loop,joules
DEC_COLUMNS=variant,backend,ms_p50,first_call_ms,peak_mb,attn_tflops,speedup_vs_self_attn,speedup_vs_loop,joules_per_step
TRAIN_COLUMNS=variant,preset,attn_backend,ms_p50,samples_per_s,peak_mb,mfu,speedup_vs_seed,speedup_vs_standard_mae
DATA_COLUMNS=stage,preset,B,ms_p50,cpu_ms_p50,windows_per_s,windows_per_cpu_s,device_copy_mb,faults_per_batch,worker_private_mb
TIMING="--warmup 3 --min-time 0.3"

# the command of a stage (printed by the dry run, run otherwise)
stage_command() {
    case "$1" in
        attention) echo "$PY -m bench.attention_speed --preset seed,wide --dtype bf16 --passes fwd+bwd" \
                        "--backends torch_varlen,triton,loop $TIMING --out $(stem attention_speed)";;
        decoder)   echo "$PY bench/decoder_speed.py --preset seed $TIMING --json $(stem decoder_speed_seed).json";;
        tests)     echo "$PY -m bench.gpu_test_plan --run -v -rA --durations=15 --junitxml=$LOGS/pytest_gpu.xml";;
        step)      echo "$PY -m pytest -o addopts= -p no:cacheprovider -m gpu -q -rA --junitxml=$LOGS/pytest_step.xml" \
                        "tests/test_buckets.py tests/test_device_data.py tests/test_train_step_sync.py";;
        data)      echo "$PY bench/data_speed.py --preset seed --stages getitem+collate,device --workers 0,4" \
                        "--device cuda --warmup 3 --min-time 0.3 --out $(stem data_speed_device_seed)";;
        wide)      echo "$PY bench/decoder_speed.py --preset wide $TIMING --json $(stem decoder_speed_wide).json";;
        kernels)   echo "$PY -m bench.attention_speed --preset seed,wide --dtype bf16 --passes fwd,bwd" \
                        "--backends triton,torch_varlen,sdpa_padded,flash_attn,xformers,flex $TIMING" \
                        "--out $(stem attention_speed_passes)";;
        train)     echo "$PY bench/train_speed.py --preset default,seed $TIMING --json $(stem train_speed).json";;
        ragged)    echo "$PY bench/decoder_speed.py --preset ragged $TIMING --json $(stem decoder_speed_ragged).json";;
        sweep)     echo "$PY bench/decoder_speed.py --preset seed --sweep batch --warmup 2 --min-time 0.2" \
                        "--json $(stem decoder_speed_sweep_batch_seed).json";;
        regional)  echo "$PY bench/decoder_speed.py --preset regional $TIMING --json $(stem decoder_speed_regional).json";;
        regional_train) echo "$PY bench/train_speed.py --preset regional --variants fused,seed $TIMING" \
                        "--json $(stem train_speed_regional).json";;
    esac
}
stage_table() {
    case "$1" in
        attention) show "$(stem attention_speed).json" "$ATTN_COLUMNS";;
        kernels)   show "$(stem attention_speed_passes).json" "$ATTN_COLUMNS";;
        decoder)   show "$(stem decoder_speed_seed).json" "$DEC_COLUMNS";;
        wide)      show "$(stem decoder_speed_wide).json" "$DEC_COLUMNS";;
        ragged)    show "$(stem decoder_speed_ragged).json" "$DEC_COLUMNS";;
        train)     show "$(stem train_speed).json" "$TRAIN_COLUMNS";;
        data)      show "$(stem data_speed_device_seed).json" "$DATA_COLUMNS";;
        regional)  show "$(stem decoder_speed_regional).json" "$DEC_COLUMNS";;
        regional_train) show "$(stem train_speed_regional).json" "$TRAIN_COLUMNS";;
    esac
}


# -- setup: the environment first, written before anything that can fail, then the imports from the
# source tree (crossmae_kernels is the kernels/ folder under its installed name)
setup() {
    {
        echo "$COMPILER_LINE"
        date -u +%Y-%m-%dT%H:%M:%SZ
        hostname
        git rev-parse HEAD 2>/dev/null || echo "git sha: ${CROSSMAE_GIT_SHA:-unknown (not a git checkout)}"
        timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi failed or not found"
    } >"$LOGS/environment.txt" 2>&1
    if ! "$PY" -c "import crossmae, crossmae_kernels" 2>/dev/null; then
        links="$(mktemp -d)"
        ln -s "$PWD/kernels" "$links/crossmae_kernels"
        export PYTHONPATH="$PWD:$links${PYTHONPATH:+:$PYTHONPATH}"
    fi
    timeout -k 5 "${BUDGET[setup]}" "$PY" - "$LOGS/gpu_label.txt" <<'EOF' >>"$LOGS/environment.txt" 2>&1
import importlib, os, platform, sys, traceback
print("python", platform.python_version(), platform.platform())
for name in ("torch", "triton", "numpy", "pynvml", "flash_attn", "xformers", "matplotlib", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "(no __version__)"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
print({k: v for k, v in os.environ.items() if k.startswith(("CROSSMAE_", "TRITON_", "CUDA_", "TORCH_", "PYTHON"))})
failed = 0
for name in ("crossmae.model", "crossmae.engine", "bench.decoder_speed"):
    try:
        importlib.import_module(name)
        print("import", name, "ok")
    except Exception:
        print("import", name, "FAILED:")
        traceback.print_exc()
        failed = 1
import torch
print("cuda", torch.version.cuda, "| available", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no device")
if not failed:
    from bench.harness import device_label
    open(sys.argv[1], "w").write(device_label("cuda") if torch.cuda.is_available() else "cpu")
sys.exit(failed)
EOF
}

if (( DRY_RUN )); then
    echo "dry run: stages in order, each with its time budget"
    printf "  %-9s %4d s  %s\n" setup "${BUDGET[setup]}" "environment.txt, then import crossmae.model, crossmae.engine, bench.decoder_speed"
    sum=${BUDGET[setup]}
    for stage in "${STAGES[@]}"; do
        printf "  %-9s %4d s  %s\n" "$stage" "${BUDGET[$stage]}" "$(stage_command "$stage")"
        sum=$(( sum + BUDGET[$stage] ))
    done
    echo "stage budgets: $sum s in all (setup and default stages: $default_total s, limit $MAX_TOTAL s)"
    status=0
    (( default_total <= MAX_TOTAL )) || { echo "FAILED: the default stages' budgets exceed $MAX_TOTAL s"; status=1; }
    echo "== GPU test plan: $PY -m bench.gpu_test_plan"
    "$PY" -m bench.gpu_test_plan 2>&1 | grep -v '^tests/'
    (( PIPESTATUS[0] == 0 )) || status=1
    exit $status
fi

mkdir -p "$LOGS"
setup
rc=$?
tail -n 3 "$LOGS/environment.txt"
if (( rc )); then
    echo "setup failed (exit $rc): see $LOGS/environment.txt"; grep -A 15 FAILED "$LOGS/environment.txt"; exit 1
fi
GPU_LABEL="$(cat "$LOGS/gpu_label.txt")"

FAILED=0
SUMMARY=()
for stage in "${STAGES[@]}"; do
    left=$(( TOTAL_BUDGET - (SECONDS - START) ))
    t=${BUDGET[$stage]}
    (( left < t )) && t=$left
    if (( t < 20 )); then
        SUMMARY+=("$stage: skipped, $left s of the budget left"); continue
    fi
    cmd="$(stage_command "$stage")"
    echo; echo "== $stage (time limit $t s): $cmd"
    began=$SECONDS
    timeout -k 10 "$t" $cmd 2>&1 | tee "$LOGS/$stage.log"
    rc=${PIPESTATUS[0]}
    (( rc )) && FAILED=1
    note=""; (( rc == 124 || rc == 137 )) && note=", cut at its time limit"
    SUMMARY+=("$stage: exit $rc$note, $(( SECONDS - began )) s")
    stage_table "$stage"
done

echo
echo "== summary ($(( SECONDS - START )) s)"
echo "$COMPILER_LINE"
for line in "${SUMMARY[@]}"; do echo "$line"; done
(( FAILED == 0 ))

#!/usr/bin/env bash
# GPU check: one prepared script for a machine with a CUDA GPU (run from anywhere).
#
#   1. makes crossmae and crossmae_kernels importable without network: an editable install
#      (pip --no-deps --no-build-isolation), or else PYTHONPATH with a crossmae_kernels -> kernels/ link;
#   2. runs the GPU tests:               python -m pytest -m gpu -q tests/
#   3. runs the attention benchmark:     python -m bench.attention_speed --preset seed,wide --dtype bf16
#   4. prints a short table last.
#
# Time limits keep the whole check well under 8 minutes: the tests get at most 210 s, the benchmark
# what is left of 420 s (at least 150 s). The benchmark saves its rows after every measurement and
# runs backend by backend, so a cut-short run keeps every backend it finished, at both presets.
#
# With $OUT set, the full results land there (6 files at most): environment.txt, install.log (only
# when an install was needed), pytest_gpu.log, attention_speed.log, attention_speed_gpu.json and
# attention_speed_gpu.csv. Without $OUT the benchmark writes
# bench/results/attention_speed_<gpu>.json/.csv and the logs go to a temporary folder.
# Exit status: 0 when the tests passed and the benchmark finished, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if [[ -n "${OUT:-}" ]]; then
    LOGS="$OUT"
else
    LOGS="$(mktemp -d)"
fi
mkdir -p "$LOGS"

echo "== install"
if ! "$PY" -c "import crossmae, crossmae_kernels" 2>/dev/null; then
    if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1; then
        echo "editable install failed (see install.log); using PYTHONPATH instead"
        links="$(mktemp -d)"
        ln -s "$PWD/kernels" "$links/crossmae_kernels"
        export PYTHONPATH="$PWD:$links${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$PY" -c "import crossmae, crossmae_kernels" || { echo "crossmae can't be imported"; exit 1; }

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    hostname
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} >"$LOGS/environment.txt" 2>&1
tail -n 1 "$LOGS/environment.txt"

echo "== GPU tests"
tests_start=$SECONDS
timeout -k 10 210 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$LOGS/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

echo "== attention benchmark"
if [[ -n "${OUT:-}" ]]; then
    stem="$OUT/attention_speed_gpu"
else
    stem="bench/results/attention_speed_$("$PY" -c 'from bench.harness import device_label; print(device_label("cuda"))')"
fi
bench_limit=$(( 420 - (SECONDS - tests_start) ))
(( bench_limit < 150 )) && bench_limit=150
echo "(time limit ${bench_limit} s)"
timeout -k 10 "$bench_limit" "$PY" -m bench.attention_speed --preset seed,wide --dtype bf16 --warmup 3 --min-time 0.3 \
    --out "$stem" 2>&1 | tee "$LOGS/attention_speed.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary"
echo "GPU tests: $(tail -n 1 "$LOGS/pytest_gpu.log") (exit $tests_rc)"
echo "benchmark: exit $bench_rc, $stem.json"
if [[ -f "$stem.json" ]]; then
    "$PY" -m bench.harness show "$stem.json" \
        --columns backend,pass,preset,D,p50_ms,tflops,peak_frac,peak_mb,vs_loop,joules
fi
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]

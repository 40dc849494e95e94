#!/usr/bin/env bash
# GPU check: one prepared script for a machine with a CUDA GPU (run from anywhere).
#
#   bash bench/gpu_check.sh [STAGE ...]      stages: tests attention decoder train sweep
#                                            (default: the first four)
#
#   0. makes crossmae and crossmae_kernels importable without network: an editable install
#      (pip --no-deps --no-build-isolation, without the C++ extension of the CPU backend), or else PYTHONPATH with a crossmae_kernels -> kernels/ link;
#   tests      the GPU tests:                 python -m pytest -m gpu -q tests/
#   attention  the attention benchmark:       python -m bench.attention_speed --preset seed,wide --dtype bf16 --passes fwd+bwd
#   decoder    the headline, one process per preset (a slow one cuts only its own rows):
#                                             python bench/decoder_speed.py --preset seed|wide|ragged
#   train      the whole training step:       python bench/train_speed.py --preset default,seed
#   sweep      (only when named) the batch sweep B = 1..64:
#                                             python bench/decoder_speed.py --preset seed --sweep batch
#   and prints a short table of each last.
#
# Time limits keep the whole check near 8 minutes: tests 120 s, attention 60 s, decoder 80 s per
# preset, train 60 s; a stage gets at most what is left of $GPU_CHECK_BUDGET (default 480 s) and is
# skipped under 30 s. `bash bench/gpu_check.sh decoder train` runs the headline benchmarks alone
# (~5 minutes). Every benchmark saves its rows after each measurement (decoder_speed measures the
# baselines first and the compiling backends, triton and flex, last), so a run cut short keeps what
# it measured.
#
# With $OUT set, the results land there: environment.txt, install.log (only when an install was
# needed), one .log per stage, attention_speed_gpu.json/.csv, decoder_speed_<preset>_gpu.json/.csv/.png
# and train_speed_gpu.json/.csv. Without $OUT the benchmarks write bench/results/<bench>_..._<gpu>.*
# and the logs go to a temporary folder.
# Exit status: 0 when every stage that ran passed or finished, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
STAGES=("$@")
(( ${#STAGES[@]} == 0 )) && STAGES=(tests attention decoder train)
for stage in "${STAGES[@]}"; do
    case "$stage" in
        tests|attention|decoder|train|sweep) ;;
        *) echo "unknown stage $stage (tests attention decoder train sweep)"; exit 2;;
    esac
done
BUDGET="${GPU_CHECK_BUDGET:-480}"
START=$SECONDS

if [[ -n "${OUT:-}" ]]; then
    LOGS="$OUT"
else
    LOGS="$(mktemp -d)"
fi
mkdir -p "$LOGS"

wants() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }
# time limit of the next step: its cap, or what is left of the budget; 0 = skip it
limit() {
    local left=$(( BUDGET - (SECONDS - START) ))
    (( left < 30 )) && { echo 0; return; }
    (( left < $1 )) && echo "$left" || echo "$1"
}
# where a benchmark writes: $OUT/<name>_gpu, or bench/results/<name>_<gpu label>
stem() {
    if [[ -n "${OUT:-}" ]]; then echo "$OUT/$1_gpu"; else echo "bench/results/$1_$GPU_LABEL"; fi
}
FAILED=0
SUMMARY=()

echo "== install"
if ! "$PY" -c "import crossmae, crossmae_kernels" 2>/dev/null; then
    # the C++ extension serves only the CPU backend: not worth device time to compile here
    if ! CROSSMAE_SKIP_EXTENSION=1 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1; then
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

GPU_LABEL="$("$PY" -c 'from bench.harness import device_label; print(device_label("cuda"))')"

if wants tests; then
    echo "== GPU tests"
    t=$(limit 120)
    if (( t > 0 )); then
        timeout -k 10 "$t" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$LOGS/pytest_gpu.log"
        rc=${PIPESTATUS[0]}; (( rc )) && FAILED=1
        SUMMARY+=("GPU tests: $(tail -n 1 "$LOGS/pytest_gpu.log") (exit $rc)")
    fi
fi

if wants attention; then
    echo "== attention benchmark"
    t=$(limit 60); out="$(stem attention_speed)"
    if (( t > 0 )); then
        echo "(time limit $t s)"
        timeout -k 10 "$t" "$PY" -m bench.attention_speed --preset seed,wide --dtype bf16 --passes fwd+bwd --warmup 3 --min-time 0.2 \
            --out "$out" 2>&1 | tee "$LOGS/attention_speed.log"
        rc=${PIPESTATUS[0]}; (( rc )) && FAILED=1
        SUMMARY+=("attention benchmark: exit $rc, $out.json")
        [[ -f "$out.json" ]] && "$PY" -m bench.harness show "$out.json" \
            --columns backend,pass,preset,D,p50_ms,tflops,peak_frac,peak_mb,vs_loop,joules
    fi
fi

if wants decoder; then
    for preset in seed wide ragged; do
        echo "== decoder step benchmark, $preset"
        t=$(limit 80); out="$(stem "decoder_speed_$preset")"
        (( t > 0 )) || continue
        echo "(time limit $t s)"
        timeout -k 10 "$t" "$PY" bench/decoder_speed.py --preset "$preset" --warmup 3 --min-time 0.3 \
            --json "$out.json" 2>&1 | tee "$LOGS/decoder_speed_$preset.log"
        rc=${PIPESTATUS[0]}; (( rc )) && FAILED=1
        SUMMARY+=("decoder benchmark $preset: exit $rc, $out.json")
        [[ -f "$out.json" ]] && "$PY" -m bench.harness show "$out.json" --columns \
            variant,backend,ms_p50,peak_mb,attn_tflops,attn_peak_frac,speedup_vs_self_attn,speedup_vs_loop,joules_per_step
    done
fi

if wants train; then
    echo "== training step benchmark"
    t=$(limit 60); out="$(stem train_speed)"
    if (( t > 0 )); then
        echo "(time limit $t s)"
        timeout -k 10 "$t" "$PY" bench/train_speed.py --preset default,seed --warmup 3 --min-time 0.3 \
            --json "$out.json" 2>&1 | tee "$LOGS/train_speed.log"
        rc=${PIPESTATUS[0]}; (( rc )) && FAILED=1
        SUMMARY+=("train benchmark: exit $rc, $out.json")
        [[ -f "$out.json" ]] && "$PY" -m bench.harness show "$out.json" --columns \
            variant,preset,attn_backend,ms_p50,samples_per_s,tokens_per_s,peak_mb,mfu,speedup_vs_seed,speedup_vs_standard_mae
    fi
fi

if wants sweep; then
    echo "== decoder batch sweep, seed"
    t=$(limit 150); out="$(stem decoder_speed_sweep_batch_seed)"
    if (( t > 0 )); then
        echo "(time limit $t s)"
        timeout -k 10 "$t" "$PY" bench/decoder_speed.py --preset seed --sweep batch --warmup 2 --min-time 0.2 \
            --json "$out.json" 2>&1 | tee "$LOGS/decoder_speed_sweep.log"
        rc=${PIPESTATUS[0]}; (( rc )) && FAILED=1
        SUMMARY+=("decoder batch sweep: exit $rc, $out.json")
    fi
fi

echo
echo "== summary ($(( SECONDS - START )) s)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
(( FAILED == 0 ))

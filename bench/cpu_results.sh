#!/usr/bin/env bash
# Regenerate every committed CPU result in bench/results/ on this machine, one benchmark after
# another (never two at once: they share the cores). About 12 minutes on the project's 2-core VM.
#   bash bench/cpu_results.sh            # all
#   bash bench/cpu_results.sh decoder    # some: attention attention1 ragged decoder decoder1 sweep train pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
R=bench/results
STEPS=${*:-attention attention1 ragged decoder decoder1 sweep train pytest}
run() { echo; echo "== $*"; /usr/bin/time -f "   wall %e s" "$@"; }
for step in $STEPS; do
  case $step in
    attention)  run $PY -m bench.attention_speed --preset cpu --backends cpu,sdpa_padded,loop,math \
                    --rounds 3 --warmup 2 --min-time 1 --out $R/cpu_backend_speed ;;
    attention1) run $PY -m bench.attention_speed --preset cpu --backends cpu,sdpa_padded,loop,math \
                    --rounds 3 --warmup 2 --min-time 1 --threads 1 --out $R/cpu_backend_speed_1thread ;;
    ragged)     run $PY -m bench.attention_speed --preset ragged --batch 4 --steps 16 \
                    --backends cpu,sdpa_padded,loop,math --rounds 3 --warmup 2 --min-time 1 \
                    --out $R/attention_speed_ragged_cpu ;;
    decoder)    run $PY bench/decoder_speed.py --preset cpu --rounds 3 --warmup 1 --min-time 1 \
                    --json $R/decoder_speed_cpu_cpu.json
                run $PY bench/decoder_speed.py --preset ragged --batch 4 --steps 16 --rounds 3 --warmup 1 \
                    --min-time 1 --json $R/decoder_speed_ragged_cpu.json ;;
    decoder1)   run $PY bench/decoder_speed.py --preset cpu --rounds 3 --warmup 1 --min-time 1 --threads 1 \
                    --json $R/decoder_speed_cpu_cpu_1thread.json ;;
    sweep)      run $PY bench/decoder_speed.py --sweep batch --rounds 3 --warmup 1 --min-time 1 \
                    --json $R/decoder_speed_sweep_batch_cpu_cpu.json ;;
    train)      run $PY bench/train_speed.py --rounds 3 --warmup 1 --min-time 1 \
                    --json $R/train_speed_default_cpu_cpu.json ;;
    pytest)     run $PY -m pytest --benchmark-only -q -p no:cacheprovider tests/benchmarks ;;
    *) echo "unknown step '$step' (attention attention1 ragged decoder decoder1 sweep train pytest)" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# Runs the benchmarks named in $@ (default: the system ones; `algorithms` is the ~100 min sweep)
# one after another — never side by side: they share the machine's 2 cores — and keeps each
# one's JSON lines in outputs/bench/<name>.jsonl, its log in <name>.log (the sweep's runs under
# outputs/bench/algorithms/, its summary.json and plot in bench/results/algorithms/).
# Called by `make bench BENCHES="..."`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(roofline overhead breakdown throughput throughput_deepspeed buffer weight_sync)
mkdir -p outputs/bench
for name in "${benches[@]}"; do
  case $name in
    roofline)   cmd=("$PY" bench/roofline.py) ;;  # first: the others read its peaks
    # no --profile here: py-spy took 1.4-2.1 CPU-seconds a round from the 2 cores it measures
    overhead)   cmd=("$PY" bench/rollout_overhead.py) ;;
    breakdown)  cmd=("$PY" bench/breakdown.py) ;;
    throughput) cmd=("$PY" bench/throughput.py) ;;
    throughput_deepspeed) cmd=("$PY" bench/throughput.py --backend deepspeed) ;;
    buffer)     cmd=("$PY" bench/buffer.py) ;;
    images)     cmd=("$PY" bench/images.py) ;;
    algorithms) cmd=("$PY" bench/algorithms.py sweep --seeds 1 2 3 4) ;;
    async)      cmd=("$PY" bench/async.py sweep) ;;  # sync vs async, ~70 min on a 2-core AVX2 EPYC
    precision)  cmd=("$PY" bench/precision.py --emulate-avx2) ;;
    vllm_start) cmd=("$PY" bench/vllm_start.py) ;;
    weight_sync) cmd=("$PY" bench/weight_sync.py) ;;
    driver_batch) cmd=("$PY" bench/driver_batch.py) ;;
    *) echo "run_all: unknown benchmark '$name' (roofline overhead breakdown throughput throughput_deepspeed buffer weight_sync driver_batch images algorithms async precision vllm_start)" >&2; exit 2 ;;
  esac
  echo "== $name: ${cmd[*]}"
  # Everything goes to outputs/bench/<name>.log (Ray forwards its workers' logs to stdout);
  # the result lines (JSON objects) to the terminal and outputs/bench/<name>.jsonl.
  "${cmd[@]}" 2>&1 | tee "outputs/bench/$name.log" | grep --line-buffered '^{' \
    | tee "outputs/bench/$name.jsonl"
done

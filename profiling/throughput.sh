#!/usr/bin/env bash
# BENCHMARKS.md "Offline throughput": LLaMA-3-8B (random weights, bf16) with default engine
# flags: const 1024/512 with 2048 requests, then the three traces, in one process (one
# start-up). About 9 minutes on an H200. `bash profiling/throughput.sh SCHEDULE` runs another
# schedule.
source "$(dirname "$0")/common.sh"
schedule=${1:-sequential}
run throughput 580 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
    --schedule="$schedule" --workload=const:1024:512 \
    --workload=trace:lmsys --workload=trace:sharegpt --workload=trace:splitwise \
    --num_requests=2048,4096,4096,1024 --output_json="$out/throughput.json"
sed -n '/^workload | /,$p' "$out/throughput.log"
grep "INFO nanoflow_jax" "$out/throughput.log" | head -20

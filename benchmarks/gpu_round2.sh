#!/usr/bin/env bash
# One device call (< 10 min on an H100): the benchmarks issue's throughput table, our engine
# and the HF transformers baseline side by side in one process, five workloads.
# Usage (device tool, repo root, carry .workloads = a copy of ../shared/workloads):
#   bash benchmarks/gpu_round2.sh
source "$(dirname "$0")/gpu_common.sh"
timeout 570 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
    --workload=const:1024:512 --workload=const:512:512 --workload=trace:splitwise \
    --workload=trace:lmsys --workload=trace:sharegpt --num_requests=256 --min_bucket=256 \
    --max_model_len=2048 --trace_dir=.workloads --baseline=hf --baseline_num_requests=64 \
    --baseline_batch_size=64 --output_json="$out/throughput_vs_hf.json" \
    > "$out/throughput_vs_hf.log" 2>&1 || echo "(exited with $?)"
grep -v "^[IW][0-9]\{4\}" "$out/throughput_vs_hf.log" | tail -14

#!/usr/bin/env bash
# One device call (< 10 min on an H100) for the measurements still open after session 1:
#   kernels issue: XLA's KV scatter; engine issue: host share at steady state;
#   pipeline issue: the overlap microbenchmark (+ XLA flags) and the step under each schedule.
# Usage (device tool, repo root):  bash benchmarks/gpu_round1.sh
# Logs go to $OUT (or ./out); the summary tables are printed last.
source "$(dirname "$0")/gpu_common.sh"
run kv_write 60 python3 scripts/bench_kernels.py --kernels=ceilings,kv_write
run overlap 90 python3 benchmarks/overlap_micro.py
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer=" \
    run overlap_lhs 90 python3 benchmarks/overlap_micro.py
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 200 python3 benchmarks/step_profile.py \
    --schedule=sequential --schedule=nano2-nooverlap --schedule=nano2 --schedule=nano3
run throughput 150 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
    --workload=const:1024:512 --num_requests=768 --max_num_seqs=384 --min_bucket=256 \
    --max_model_len=2048 --output_json="$out/throughput.json"
for name in kv_write overlap overlap_lhs step_profile throughput; do
    echo; echo "== $name (tail)"; grep -v "^[IW][0-9]\{4\}" "$out/$name.log" | tail -12
done

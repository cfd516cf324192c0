#!/usr/bin/env bash
# One device call (~9 min on an H100), session 5: end to end at const 1024/512 (256 requests)
# with the pipelines splitting only the 1024-token bucket (`-min1024`), against
# sequential+graph, each its own process.
# Usage (device tool, repo root): bash benchmarks/gpu_round27.sh
source "$(dirname "$0")/gpu_common.sh"
e2e() {  # name, timeout, flags...
    local name=$1 limit=$2; shift 2
    run "$name" "$limit" python3 scripts/benchmark_throughput.py --model=llama-3-8b \
        --workload=const:1024:512 --min_bucket=256 --max_model_len=2048 --num_requests=256 "$@"
    echo "-- $name $*"
    grep "^peak_tflops\|^total_tokens_per_s\|percent_of_optimal\|^step_ms\|^full_batch_step_ms\|^launch_ms\|^compile_s\|Error" \
        "$out/$name.log" | tr -s ' ' | tr '\n' ';' | cut -c1-400; echo
}
e2e seq_graph 150 --schedule=sequential+graph
e2e pipe_min 150 --schedule=nano2-pipe-nostreams-min1024+graph
e2e partitioned_min 280 --schedule=nano2-pipe-nostreams-sm33-gemm67-min1024+graph

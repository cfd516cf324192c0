#!/usr/bin/env bash
# One device call (~7 min on an H100), session 5: end to end after the step lost its
# device-side branch (round 24), each its own process: const 1024/512 with 256 requests under
# sequential+graph and nano2-pipe-nostreams+graph, and the 768-request run of session 2
# (max_num_seqs=384) under sequential.
# Usage (device tool, repo root): bash benchmarks/gpu_round25.sh
source "$(dirname "$0")/gpu_common.sh"
e2e() {  # name, flags...
    local name=$1; shift
    run "$name" 200 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
        --workload=const:1024:512 --min_bucket=256 --max_model_len=2048 "$@"
    echo "-- $name $*"
    grep "^peak_tflops\|^total_tokens_per_s\|percent_of_optimal\|^step_ms\|^full_batch_step_ms\|^launch_ms\|^wait_ms\|^host_ms\|Error" \
        "$out/$name.log" | tr -s ' ' | tr '\n' ';' | cut -c1-400; echo
}
e2e seq_graph --num_requests=256 --schedule=sequential+graph
e2e pipe_graph --num_requests=256 --schedule=nano2-pipe-nostreams+graph
e2e seq_768 --num_requests=768 --max_num_seqs=384

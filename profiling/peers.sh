#!/usr/bin/env bash
# BENCHMARKS.md "HF transformers on the same workload": transformers' static batching and its
# continuous batching on the LLaMA-3-8B shape at const 1024/512, 64 requests (each peer stops
# after 90 s with a peer_error row). About 4 minutes on an H200.
source "$(dirname "$0")/common.sh"
run peers 580 python3 scripts/benchmark_throughput.py --model=llama-3-8b --max_model_len=2048 \
    --workload=const:1024:512 --num_requests=64 --baseline=hf-static,hf-cb --baseline_only \
    --baseline_batch_size=64 --baseline_timeout_s=90 --output_json="$out/peers.json"
sed -n '/^workload | /,$p' "$out/peers.log"

#!/usr/bin/env bash
# BENCHMARKS.md "Offline throughput, HF transformers peers": HF transformers on the same
# LLaMA-3-8B shape and workloads as profiling/throughput.sh, fewer requests (they are slower).
source "$(dirname "$0")/common.sh"
run peers 580 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
    --workload=const:1024:512 --workload=trace:sharegpt --num_requests=256 \
    --baseline=hf-only --output_json="$out/peers.json"
sed -n '/^workload | /,$p' "$out/peers.log"

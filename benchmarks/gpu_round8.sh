#!/usr/bin/env bash
# One device call (~8 min on an H100), session 3: end to end at const 1024/512 (256 requests)
# under the sequential schedule, the pipeline without overlap (the cost of splitting) and the
# pipeline with XLA's concurrent CUDA graph, each in its own process.
# Usage (device tool, repo root): bash benchmarks/gpu_round8.sh
source "$(dirname "$0")/gpu_common.sh"
for s in sequential:120 nano2-pipe-nostreams:170 nano2-pipe-nostreams+graph:170; do
    run "throughput_${s%%:*}" "${s##*:}" python3 scripts/benchmark_throughput.py \
        --model=llama-3-8b --workload=const:1024:512 --num_requests=256 --min_bucket=256 \
        --max_model_len=2048 --schedule="${s%%:*}" --output_json="$out/${s%%:*}.json"
done
for f in "$out"/throughput_*.log; do grep -v "^[IW][0-9]\{4\}" "$f" | tail -2 | cut -c1-400; done

#!/usr/bin/env bash
# One device call (~6 min on an H100), session 6: end to end at const 1024/512 with plentiful
# requests (2048, NanoFlow's offline-throughput regime: the ramp and the decode-only tail are
# a small part of the run), sequential+graph, with the GEMM ceiling now timed back to back.
# Steady state needs ~341 decoding sequences (1024 tokens per step, 2/3 of them prefill).
# Ran with sequential+graph, nano2-pipe-nostreams-min1024+graph,
# nano2-pipe-nostreams-sm33-gemm67-min1024+graph and nano2-pipe-nostreams-min1024.
# Usage (device tool, repo root): bash benchmarks/gpu_round35.sh [schedule]
source "$(dirname "$0")/gpu_common.sh"
schedule=${1:-sequential+graph}
run e2e 570 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
    --workload=const:1024:512 --min_bucket=256 --max_model_len=2048 --num_requests=2048 \
    --max_num_seqs=352 --gpu_memory_utilization=0.95 --schedule=$schedule
grep -A45 "^model  " "$out/e2e.log" | grep -v "^I1\|^W1" | cut -c1-200 | head -45
grep "Error\|Traceback" "$out/e2e.log" | head

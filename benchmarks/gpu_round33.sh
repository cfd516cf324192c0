#!/usr/bin/env bash
# One device call (~4 min on an H100), session 6: the tick again with device time per call
# (10 calls back to back), split into its parts: the persistent GEMM side alone on G CTAs, the
# Mosaic GPU attention alone on the other SMs, and both at once (concurrent graph), for the
# tick's GEMM chain and for the single up/gate GEMM of the issue's microbenchmark.
# Usage (device tool, repo root): bash benchmarks/gpu_round33.sh
source "$(dirname "$0")/gpu_common.sh"
show() {  # name: the timing rows and errors of one log
    grep "|\|rel err" "$out/$1.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
    grep -m3 -B2 -A12 "Traceback" "$out/$1.log" | grep -v "^  File\|^    " | head -30
}
run chain 240 python3 benchmarks/overlap_micro.py --persistent_programs= --chain \
    --mgpu_programs=88,99 --rest_per_sm=1 --mgpu_attention_programs=33,44
echo "-- chain"; show chain
run upgate 240 python3 benchmarks/overlap_micro.py --persistent_programs= \
    --mgpu_programs=66,88 --rest_per_sm=1 --mgpu_attention_programs=44,66
echo "-- up/gate GEMM"; show upgate

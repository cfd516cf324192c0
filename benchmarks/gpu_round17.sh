#!/usr/bin/env bash
# One short device call (~3 min on an H100), session 4: the Mosaic GPU decode attention's
# block size, ring depth and CTAs per free SM, beside a tick's GEMM chain on the other SMs.
# Usage (device tool, repo root): bash benchmarks/gpu_round17.sh
source "$(dirname "$0")/gpu_common.sh"
micro() {  # name, flags...
    local name=$1; shift
    run "$name" 120 python3 benchmarks/overlap_micro.py --persistent_programs= --chain "$@"
    echo "-- $name $*"
    grep "^back to back |\|^gemm alone\|^attention alone\|mgpu\|^ideal" "$out/$name.log" | cut -c1-150
    grep -m1 -A3 "Traceback" "$out/$name.log" | tail -1 | cut -c1-300
}
micro ppb8_s2 --mgpu_attention_programs=33,44,66 --mgpu_attention_tuning=pages_per_block=8,stages=2
micro ppb4_s2_x2 --mgpu_attention_programs=33,44,66 --mgpu_attention_tuning=pages_per_block=4,stages=2 \
    --mgpu_attention_per_sm=2
micro ppb4_s6 --mgpu_attention_programs=44 --mgpu_attention_tuning=pages_per_block=4,stages=6
micro ppb8_s3 --mgpu_attention_programs=44 --mgpu_attention_tuning=pages_per_block=8,stages=3

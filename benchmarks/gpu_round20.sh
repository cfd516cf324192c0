#!/usr/bin/env bash
# One device call (~5 min on an H100), session 5: the Mosaic GPU decode attention with one
# computing warpgroup against two (each takes every other KV block of an item; consumer 0
# merges), alone on 33 / 44 / 66 / 132 CTAs, then the two-consumer kernel beside a tick's
# GEMM chain on the other SMs.
# Usage (device tool, repo root): bash benchmarks/gpu_round20.sh
source "$(dirname "$0")/gpu_common.sh"
show() {  # name: the timing rows and errors of one log
    grep "|\|rel err" "$out/$1.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
    grep -m3 -B2 -A12 "Traceback" "$out/$1.log" | grep -v "^  File\|^    " | head -30
}
for tuning in consumers=1 consumers=2 consumers=2,pages_per_block=8,stages=2; do
    name=attn_${tuning//[=,]/_}
    run "$name" 150 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --mgpu_attention_programs=33,44,66,132 --mgpu_attention_tuning=$tuning
    echo "-- $tuning"; show "$name"
done
run chain 200 python3 benchmarks/overlap_micro.py --persistent_programs= --chain \
    --mgpu_attention_programs=33,44,66 --mgpu_attention_tuning=consumers=2
echo "-- chain, consumers=2"; show chain

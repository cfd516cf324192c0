#!/usr/bin/env bash
# One device call (~6 min on an H100), session 5: the transposed Mosaic GPU decode attention
# (S^T = K Q^T with the GQA group as WGMMA's N = 16, P^T through shared memory), with one or
# two computing warpgroups and several ring depths, alone on 33 / 44 / 66 / 132 CTAs; then
# beside a tick's GEMM chain on the other SMs.
# Ran at commit 29c7d15; the transposed layout was removed after it (slower with one consumer,
# and two consumers race on Mosaic GPU's shared cross-warp reduction scratch).
# Usage (device tool, repo root): git checkout 29c7d15 && bash benchmarks/gpu_round21.sh
source "$(dirname "$0")/gpu_common.sh"
show() {  # name: the timing rows and errors of one log
    grep "|\|rel err" "$out/$1.log" | grep "mgpu attention alone\|^attention alone\|^gemm alone\|^back to back |\|mgpu GEMM\|^ideal" \
        | grep -v "^streams" | cut -c1-200
    grep -m3 -B2 -A12 "Traceback" "$out/$1.log" | grep -v "^  File\|^    " | head -30
}
for tuning in transposed=0,consumers=2 consumers=1 consumers=2 consumers=2,stages=6 \
        consumers=2,pages_per_block=8,stages=2; do
    name=attn_${tuning//[=,]/_}
    run "$name" 150 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --mgpu_attention_programs=33,44,66,132 --mgpu_attention_tuning=$tuning
    echo "-- $tuning"; show "$name"
done
for tuning in consumers=2 consumers=2,stages=6; do
    name=chain_${tuning//[=,]/_}
    run "$name" 150 python3 benchmarks/overlap_micro.py --persistent_programs= --chain \
        --mgpu_attention_programs=33,44 --mgpu_attention_tuning=$tuning
    echo "-- chain, $tuning"; show "$name"
done

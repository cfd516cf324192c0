#!/usr/bin/env bash
# One device call (~3 min on an H100), session 5: the Mosaic GPU attention with each
# consumer's P V and next Q K^T issued together (`pipelined`), against the plain loop, alone
# on 33 / 44 / 66 / 132 CTAs; then the pipelined kernel beside a tick's GEMM chain.
# Ran at commit ee061ef; the pipelined loop was removed after it (1.8x slower: round 29).
# Usage (device tool, repo root): git checkout ee061ef && bash benchmarks/gpu_round29.sh
source "$(dirname "$0")/gpu_common.sh"
show() {
    grep "mgpu attention alone\|^attention alone\|^gemm alone\|^back to back |\|concurrent graph, mgpu\|^ideal\|rel err" \
        "$out/$1.log" | cut -c1-130
    grep -m3 -B2 -A12 "Traceback" "$out/$1.log" | grep -v "^  File\|^    " | head -30
}
for tuning in pipelined=0 pipelined=1; do
    name=attn_${tuning//=/_}
    run "$name" 150 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --mgpu_attention_programs=33,44,66,132 --mgpu_attention_tuning=$tuning
    echo "-- $tuning"; show "$name"
done
run chain 150 python3 benchmarks/overlap_micro.py --persistent_programs= --chain \
    --mgpu_attention_programs=33,44 --mgpu_attention_tuning=pipelined=1
echo "-- chain, pipelined=1"; show chain

#!/usr/bin/env bash
# BENCHMARKS.md "The overlap mechanism": the Mosaic GPU decode attention's bandwidth against its
# CTA count (LLaMA-3-8B heads, 300 and 150 sequences of 1300 tokens), and a pipeline tick's
# GEMM chain on G CTAs beside that attention on the rest, against both back to back. About 5
# minutes on an H200.
source "$(dirname "$0")/common.sh"
for decodes in 300 150; do
    run "attention_$decodes" 150 python3 profiling/attention_ablation.py --decodes=$decodes \
        --context=1300 --programs=8,16,26,33,44,66,132
    table "attention_$decodes"
done
run tick 240 python3 profiling/overlap_micro.py --persistent_programs= --chain \
    --mgpu_programs=88,99 --rest_per_sm=1 --mgpu_attention_programs=33,44
table tick

#!/usr/bin/env bash
# One short device call (~3 min on an H100), session 4: the Mosaic GPU decode attention
# (TMA page ring) alone on 33 / 44 / 66 / 132 CTAs, against the Triton kernel, and beside the
# persistent GEMM (one GEMM, then a tick's chain) on the other SMs.
# Usage (device tool, repo root): bash benchmarks/gpu_round16.sh
source "$(dirname "$0")/gpu_common.sh"
run micro_mgpu_attn 200 python3 benchmarks/overlap_micro.py --persistent_programs= \
    --mgpu_attention_programs=33,44,66,132
grep "|\|rel err" "$out/micro_mgpu_attn.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
grep -m3 -B2 -A12 "Traceback" "$out/micro_mgpu_attn.log" | grep -v "^  File\|^    " | head -30
if grep -q "^mgpu attention alone, 44 CTAs | [0-9]" "$out/micro_mgpu_attn.log"; then
    run micro_mgpu_attn_chain 200 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --chain --mgpu_attention_programs=33,44,66
    grep "|\|rel err" "$out/micro_mgpu_attn_chain.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
fi

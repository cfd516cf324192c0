#!/usr/bin/env bash
# One device call (~3 min on an H100), session 5: the Mosaic GPU attention (two consumers)
# with registers moved from the producer to the consumers (setmaxnreg: 232 / 40, as JAX's
# FlashAttention-3 kernel), plain and pipelined loop, against the plain loop without.
# Ran at commit d9f336c; the pipelined loop and the registers option were removed after it.
# Usage (device tool, repo root): git checkout d9f336c && bash benchmarks/gpu_round30.sh
source "$(dirname "$0")/gpu_common.sh"
for tuning in pipelined=0 pipelined=0,registers=232 pipelined=1,registers=232; do
    name=attn_${tuning//[=,]/_}
    run "$name" 120 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --mgpu_attention_programs=33,44,66,132 --mgpu_attention_tuning=$tuning
    echo "-- $tuning"
    grep "mgpu attention alone\|^attention alone" "$out/$name.log" | grep -v "rel err" | cut -c1-100
    grep "rel err" "$out/$name.log" | head -1
    grep -m3 -B2 -A12 "Traceback" "$out/$name.log" | grep -v "^  File\|^    " | head -20
done

#!/usr/bin/env bash
# One device call (~6 min on an H100), session 6: the Mosaic GPU decode attention taking two
# KV blocks per consumer step (both Q K^T issued, one wait, one softmax, one P V accumulator)
# and with registers moved from the producer (setmaxnreg 232 / 40); then a tick's GEMM chain
# beside it, timed as device time per call (10 calls back to back: sessions 2-5 blocked each
# call, which added 0.1-0.25 ms of host launch and sync to every variant).
# Ran at commit e6495dd; `blocks_per_step`, `registers` and `ablate` were removed after it.
# Usage (device tool, repo root): git checkout e6495dd && bash benchmarks/gpu_round32.sh
source "$(dirname "$0")/gpu_common.sh"
run ablation 300 python3 benchmarks/attention_ablation.py --programs=33,44,132 \
    --tunings="consumers=2;registers=232;blocks_per_step=2;blocks_per_step=2,registers=232;consumers=1,stages=6,blocks_per_step=2;blocks_per_step=2,ablate=3"
grep -A40 "^variant" "$out/ablation.log"
grep "failed" "$out/ablation.log" | head -10
for tuning in consumers=2 blocks_per_step=2,registers=232; do
    name=chain_${tuning//[=,]/_}
    run "$name" 200 python3 benchmarks/overlap_micro.py --persistent_programs= --chain \
        --mgpu_attention_programs=33,44 --mgpu_attention_tuning=$tuning
    echo "-- chain, $tuning"
    grep "|\|rel err" "$out/$name.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
    grep -m3 -B2 -A12 "Traceback" "$out/$name.log" | grep -v "^  File\|^    " | head -30
done

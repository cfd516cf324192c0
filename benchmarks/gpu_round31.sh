#!/usr/bin/env bash
# One device call (~4 min on an H100), session 6: where the Mosaic GPU decode attention's time
# goes, by removing part of each consumer's work (the kernel's `ablate`, removed after round 32).
# Ran at commit 0058a2e (whose script printed TB/s 1000x too small: read the ms).
# Usage (device tool, repo root): git checkout e6495dd && bash benchmarks/gpu_round31.sh
source "$(dirname "$0")/gpu_common.sh"
run ablation 540 python3 benchmarks/attention_ablation.py --programs=33,44,132 \
    --tunings="ablate=0;ablate=1;ablate=2;ablate=3;ablate=4;consumers=1;consumers=1,stages=6;consumers=1,stages=6,ablate=3;consumers=1,stages=6,ablate=4"
grep -B3 -A40 "^variant" "$out/ablation.log" | grep -v "^$" | head -60
grep "failed\|Error" "$out/ablation.log" | head -10

#!/usr/bin/env bash
# One short device call (~4 min on an H100), session 3: SM partitioning on the GEMM side, in
# the fused kernel (one launch): a fixed number of persistent GEMM programs beside the decode
# attention programs, in two program orders.
# Usage (device tool, repo root): bash benchmarks/gpu_round10.sh
source "$(dirname "$0")/gpu_common.sh"
for v in 100:gemm_first 100:alternate 66:alternate; do
    run "micro_${v/:/_}" 80 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --fused_gemm_programs="${v%%:*}" --fused_interleave="${v##*:}"
done
for f in "$out"/micro_*.log; do echo "$f"; grep "back to back |\|fused\|alone" "$f" | cut -c1-200; done

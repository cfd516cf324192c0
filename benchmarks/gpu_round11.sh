#!/usr/bin/env bash
# One short device call (~4 min on an H100), session 4: SM partitioning with a persistent
# Mosaic GPU GEMM (pallas_kernels/persistent_matmul.py) on G CTAs beside the decode attention,
# two CTA tilings.
# Usage (device tool, repo root): bash benchmarks/gpu_round11.sh
source "$(dirname "$0")/gpu_common.sh"
run micro_mgpu_n 200 python3 benchmarks/overlap_micro.py --persistent_programs=32,44 \
    --mgpu_programs=132,112,100,88
run micro_mgpu_m 150 python3 benchmarks/overlap_micro.py --persistent_programs= \
    --mgpu_programs=132,100 --mgpu_tiling=wg_split_m=1
for f in "$out"/micro_*.log; do echo "$f"; grep "|\|rel err" "$f" | cut -c1-200; tail -3 "$f" | cut -c1-300; done

#!/usr/bin/env bash
# One short device call (~3 min on an H100), session 4: the tick's GEMM chain persistent on G
# CTAs beside the decode attention made persistent on m x (132 - G) programs, so that the
# attention cannot take the SMs a finished GEMM leaves to the next GEMM of the chain.
# Usage (device tool, repo root): bash benchmarks/gpu_round14.sh
source "$(dirname "$0")/gpu_common.sh"
run micro_chain_rest 260 python3 benchmarks/overlap_micro.py --chain --persistent_programs= \
    --mgpu_programs=100,88,66 --rest_per_sm=2,4
grep "|\|rel err" "$out/micro_chain_rest.log" | grep -v "^mgpu GEMM alone.*rel err" | cut -c1-200
tail -2 "$out/micro_chain_rest.log" | cut -c1-300

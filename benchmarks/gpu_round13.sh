#!/usr/bin/env bash
# One short device call (~2 min on an H100), session 4: a pipeline tick's GEMM chain (o_proj,
# up/gate, down, qkv of 512 tokens), cuBLAS or persistent on G CTAs, beside the decode
# attention of 150 x 1300 tokens: does the step's tick overlap as the single GEMM did?
# Usage (device tool, repo root): bash benchmarks/gpu_round13.sh
source "$(dirname "$0")/gpu_common.sh"
run micro_chain 200 python3 benchmarks/overlap_micro.py --chain --persistent_programs= \
    --mgpu_programs=132,112,100,88
grep "|\|rel err" "$out/micro_chain.log" | cut -c1-220; tail -3 "$out/micro_chain.log" | cut -c1-300

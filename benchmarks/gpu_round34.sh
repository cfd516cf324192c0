#!/usr/bin/env bash
# One device call (~9 min on an H100), session 6: does the SM partition gain once the GEMMs
# need less of HBM? Nano-batches of 1024 tokens (a 2048-token dense batch) halve the weight
# bytes per FLOP. The tick (chain on G CTAs beside the attention of 150 decodes on the rest),
# then the mixed step at T = 2048 (300 decodes of 1300 tokens + a 1748-token prompt chunk).
# Usage (device tool, repo root): bash benchmarks/gpu_round34.sh
source "$(dirname "$0")/gpu_common.sh"
show() {  # name: the timing rows and errors of one log
    grep "|\|rel err" "$out/$1.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
    grep -m3 -B2 -A12 "Traceback" "$out/$1.log" | grep -v "^  File\|^    " | head -30
}
run chain1024 200 python3 benchmarks/overlap_micro.py --persistent_programs= --chain \
    --gemm_tokens=1024 --mgpu_programs=88,99 --rest_per_sm=1 --mgpu_attention_programs=33,44
echo "-- chain, 1024-token nano-batch"; show chain1024
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step2048 420 python3 benchmarks/step_profile.py \
    --mixed_only --mixed_tokens=2048 --repeats=10 --schedule=sequential+graph \
    --schedule=nano2-pipe-nostreams-sm33-gemm67+graph
grep "^row:\|failed\|Error\|^peak" "$out/step2048.log" | cut -c1-400

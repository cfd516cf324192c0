#!/usr/bin/env bash
# One device call (~6 min on an H100), session 4: the mixed T=1024 step with both halves of
# the SM partition: the GEMM chain persistent on 67 % of the SMs (88 CTAs) and the decode
# attention on the Mosaic GPU kernel on 33 % (44 CTAs), in the concurrent graph and on streams.
# Usage (device tool, repo root): bash benchmarks/gpu_round18.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 560 python3 benchmarks/step_profile.py \
    --mixed_only --repeats=10 --schedule=sequential \
    --schedule=nano2-pipe-nostreams-sm33-gemm67+graph --schedule=nano2-pipe-sm33-gemm67
grep "^row:\|failed\|Error" "$out/step_profile.log" | cut -c1-400
tail -4 "$out/step_profile.log" | cut -c1-300

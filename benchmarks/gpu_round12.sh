#!/usr/bin/env bash
# One device call (~6 min on an H100), session 4: the mixed T=1024 step with the GEMM chain
# persistent on 85 % / 76 % of the SMs (112 / 100 CTAs) beside full-grid attention in the
# concurrent graph, against sequential and the unpartitioned pipeline.
# Usage (device tool, repo root): bash benchmarks/gpu_round12.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 520 python3 benchmarks/step_profile.py \
    --mixed_only --repeats=10 --schedule=sequential --schedule=nano2-pipe-nostreams+graph \
    --schedule=nano2-pipe-nostreams-gemm85+graph --schedule=nano2-pipe-nostreams-gemm76+graph
grep "^row:\|failed\|Error" "$out/step_profile.log" | cut -c1-400
tail -5 "$out/step_profile.log" | cut -c1-300

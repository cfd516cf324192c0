#!/usr/bin/env bash
# One device call (~8 min on an H100), session 3: the cross-layer pipeline with the KV write
# kept off the side streams, and decode attention as a persistent kernel on a share of the
# SMs (SM partitioning by grid size), in the mixed T=1024 step and in the microbenchmark;
# the tiny-model check that these schedules generate the sequential tokens.
# Usage (device tool, repo root): bash benchmarks/gpu_round6.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 300 python3 benchmarks/step_profile.py \
    --mixed_only --schedule=sequential --schedule=nano2-pipe --schedule=nano2-pipe-sm25 \
    --schedule=nano2-pipe-sm50 --schedule=nano2-pipe-nostreams-sm25+graph \
    --schedule=nano2-pipe+graph
run overlap_micro 120 python3 benchmarks/overlap_micro.py
run engine_check 100 python3 benchmarks/gpu_engine_check.py nano2-pipe nano2-pipe-sm25
grep "^row:\|failed" "$out/step_profile.log" | cut -c1-400
grep " | \|failed" "$out/overlap_micro.log" | cut -c1-300
grep "gpu_engine_check\|Error" "$out/engine_check.log" | cut -c1-300

#!/usr/bin/env bash
# One device call (~8 min on an H100), session 3: the mixed T=1024 step under the sequential
# schedule and the cross-layer pipeline, each with and without streams and with and without
# XLA's concurrent CUDA graphs; the GEMM-beside-attention microbenchmark with the concurrent
# graph; the tiny-model check that the pipelined schedules generate the sequential tokens.
# Usage (device tool, repo root): bash benchmarks/gpu_round5.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 330 python3 benchmarks/step_profile.py \
    --mixed_only --schedule=sequential --schedule=sequential+graph \
    --schedule=nano2-pipe-nostreams --schedule=nano2-pipe \
    --schedule=nano2-pipe-nostreams+graph --schedule=nano2-pipe+graph
run overlap_micro 100 python3 benchmarks/overlap_micro.py
run engine_check 110 python3 benchmarks/gpu_engine_check.py nano2-pipe nano2-pipe-nostreams+graph
grep "^row:\|failed" "$out/step_profile.log" | cut -c1-400
grep " | \|failed" "$out/overlap_micro.log" | cut -c1-300
grep "gpu_engine_check\|Error" "$out/engine_check.log" | cut -c1-300

#!/usr/bin/env bash
# One device call (~8 min on an H100), session 3: can persistent decode attention on a share
# of the SMs keep its bandwidth with more warps and stages in flight (microbenchmark), and the
# step of the pipelined schedules without the cache copies, with the numerical check against
# the sequential schedule's top log-probabilities.
# Usage (device tool, repo root): bash benchmarks/gpu_round7.sh
source "$(dirname "$0")/gpu_common.sh"
run overlap_micro 100 python3 benchmarks/overlap_micro.py --persistent_programs=33,66,132 \
    --persistent_tuning=num_warps=8,num_stages=4
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 330 python3 benchmarks/step_profile.py \
    --mixed_only --repeats=10 --schedule=sequential --schedule=nano2-pipe \
    --schedule=nano2-pipe+graph --schedule=nano3-pipe
grep " | \|failed" "$out/overlap_micro.log" | cut -c1-300
grep "^row:\|failed" "$out/step_profile.log" | cut -c1-400

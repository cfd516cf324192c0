#!/usr/bin/env bash
# One device call (~7 min on an H100), session 5: kernel timelines of the mixed T=1024 step
# after the sampler stopped computing unrequested top logprobs, and the SM-partitioned
# pipeline with the two-consumer Mosaic GPU attention (44 and 33 CTAs).
# Usage (device tool, repo root): bash benchmarks/gpu_round22.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_trace 560 python3 benchmarks/step_profile.py \
    --mixed_only --repeats=5 --trace_dir=/tmp/traces --schedule=sequential \
    --schedule=nano2-pipe-nostreams-sm33-gemm67+graph \
    --schedule=nano2-pipe-nostreams-sm25-gemm75+graph
grep "^row:\|^trace:\|failed\|Error" "$out/step_trace.log" | cut -c1-900

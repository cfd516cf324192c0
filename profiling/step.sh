#!/usr/bin/env bash
# BENCHMARKS.md "The model step": device time of one LLaMA-3-8B step (mixed, decode-only and
# prefill-only batches) under the sequential schedule and the best pipelined one, and where a
# step's kernel time goes (a jax.profiler trace of 2 steps per case, summed by kernel kind).
# About 5 minutes on an H200.
source "$(dirname "$0")/common.sh"
run step 500 python3 profiling/step_profile.py --model=llama-3-8b --schedule=sequential \
    --schedule=nano2-pipe-nostreams-min1024+graph --trace_dir=/tmp/step_traces
grep "|" "$out/step.log" | grep -v "^trace:" | cut -c1-220
grep "^trace:" "$out/step.log" | cut -c1-900

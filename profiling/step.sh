#!/usr/bin/env bash
# BENCHMARKS.md "The model step": device time of one LLaMA-3-8B step (mixed, decode-only and
# prefill-only batches) under the sequential schedule and the best pipelined one. About 4
# minutes on an H200.
source "$(dirname "$0")/common.sh"
run step 400 python3 profiling/step_profile.py --model=llama-3-8b --schedule=sequential \
    --schedule=nano2-pipe-nostreams-min1024+graph
table step

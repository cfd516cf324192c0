#!/usr/bin/env bash
# One device call (~3 min on an H100), session 5: the step without a device-side branch (the
# sampler's work chosen on the host, `SampleMode`): does enqueueing a step still block, and
# what does it give end to end at const 1024/512 (sequential schedule)?
# Usage (device tool, repo root): bash benchmarks/gpu_round24.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step 240 python3 benchmarks/step_profile.py --mixed_only \
    --repeats=10 --schedule=sequential --logprobs=0,20
grep "^row:\|failed\|Error" "$out/step.log" | cut -c1-600
run e2e 330 python3 scripts/benchmark_throughput.py --model=llama-3-8b --workload=const:1024:512 \
    --num_requests=256 --min_bucket=256 --max_model_len=2048
grep -A40 "^schedule  " "$out/e2e.log" | grep -v "^I1\|^W1" | cut -c1-200 | head -40

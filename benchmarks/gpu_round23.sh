#!/usr/bin/env bash
# One device call (~5 min on an H100), session 5: the sequential schedule after the sampler
# stopped computing unrequested top logprobs (a [B, 128256] top-k XLA ran as a CUB sort,
# 3.1 ms of each T=1024 step in round 19): the mixed step without and with 20 top logprobs
# asked for (one process), then end to end at const 1024/512.
# Usage (device tool, repo root): bash benchmarks/gpu_round23.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step 240 python3 benchmarks/step_profile.py --mixed_only \
    --repeats=10 --trace_dir=/tmp/traces --schedule=sequential --logprobs=0,20
grep "^row:\|^trace:\|failed\|Error" "$out/step.log" | cut -c1-600
run e2e 330 python3 scripts/benchmark_throughput.py --model=llama-3-8b --workload=const:1024:512 \
    --num_requests=256 --min_bucket=256 --max_model_len=2048
grep -i "tok/s\|optimal\|schedule\|step ms\|Error" "$out/e2e.log" | cut -c1-300 | tail -15

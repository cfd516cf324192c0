#!/usr/bin/env bash
# One device call (~6 min on an H100), session 3: where the concurrent graph's end-to-end gain
# comes from: const 1024/512 end to end with the sequential schedule in a concurrent graph and
# with four nano-batches; the three step cases (mixed, decode-only, prefill-only) under the
# sequential schedule and the two-nano-batch pipeline in a concurrent graph.
# Usage (device tool, repo root): bash benchmarks/gpu_round9.sh
source "$(dirname "$0")/gpu_common.sh"
for s in sequential+graph:100 nano4-pipe-nostreams+graph:150; do
    name=${s%%:*}; name=${name//+/_}  # '+' is not carried back by the device tool
    run "throughput_$name" "${s##*:}" python3 scripts/benchmark_throughput.py \
        --model=llama-3-8b --workload=const:1024:512 --num_requests=256 --min_bucket=256 \
        --max_model_len=2048 --schedule="${s%%:*}" --output_json="$out/$name.json"
done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 230 python3 benchmarks/step_profile.py \
    --repeats=10 --schedule=sequential --schedule=nano2-pipe-nostreams+graph
for f in "$out"/throughput_*.log; do grep -v "^[IW][0-9]\{4\}" "$f" | tail -1 | cut -c1-400; done
grep "^row:\|failed" "$out/step_profile.log" | cut -c1-400

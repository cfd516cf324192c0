#!/usr/bin/env bash
# One device call (< 10 min on an H100), session 2: nano-batch schedules with nested jits
# inlined (step + overlap micro), the Pallas KV write vs XLA's scatter, the remaining
# throughput workloads, and one serving curve on the splitwise trace.
# Usage (device tool, repo root; carry .workloads and .whl = the server's wheels for cp312):
#   bash benchmarks/gpu_round3.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step_profile 170 python3 benchmarks/step_profile.py \
    --schedule=nano2 --schedule=nano3
run overlap 55 python3 benchmarks/overlap_micro.py
run kv_write 40 python3 scripts/bench_kernels.py --kernels=kv_write
run throughput 150 python3 scripts/benchmark_throughput.py --model=llama-3-8b \
    --workload=const:512:512 --workload=trace:splitwise --workload=trace:lmsys \
    --workload=trace:sharegpt --num_requests=256 --min_bucket=256 --max_model_len=2048 \
    --trace_dir=.workloads --output_json="$out/throughput.json"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl > "$out/pip.log" 2>&1
PYTHONPATH=/tmp/site:. run serving 150 python3 scripts/benchmark_serving.py --start_server \
    --model=llama-3-8b --workload=trace:splitwise --trace_dir=.workloads --rates=2,4,8 \
    --num_requests=40 --max_model_len=2048 --max_num_seqs=256 --server_arg=--min_bucket=256 \
    --output_json="$out/serving.json" --output_png="$out/serving.png"
for name in step_profile overlap kv_write throughput serving; do
    echo; echo "== $name (tail)"; grep -v "^[IW][0-9]\{4\}" "$out/$name.log" | tail -14
done

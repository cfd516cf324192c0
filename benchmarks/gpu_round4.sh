#!/usr/bin/env bash
# One short device call (~5 min on an H100), session 2: the mixed T=1024 step under the
# sequential, stream-only and stream + scheduling-group schedules, then end to end (const
# 1024/512, 256 requests) with whichever nano schedule had the fastest step.
# Usage (device tool, repo root): bash benchmarks/gpu_round4.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 150 python3 benchmarks/step_profile.py --mixed_only \
    --schedule=sequential --schedule=nano2 --schedule=nano2-grouped --schedule=nano3-grouped \
    > "$out/step_profile.log" 2>&1 || echo "(step_profile exited with $?)"
best=$(grep "^row: nano" "$out/step_profile.log" | sort -t'|' -k4 -g | head -1 | cut -d' ' -f2)
echo "fastest nano schedule: ${best:=nano2-grouped}"
timeout 125 python3 scripts/benchmark_throughput.py --model=llama-3-8b --workload=const:1024:512 \
    --num_requests=256 --min_bucket=256 --max_model_len=2048 --schedule="$best" \
    --output_json="$out/throughput.json" > "$out/throughput.log" 2>&1 || echo "(throughput exited with $?)"
grep "^row:\|failed" "$out/step_profile.log" | cut -c1-400
grep -v "^[IW][0-9]\{4\}" "$out/throughput.log" | tail -3

#!/usr/bin/env bash
# One device call (~8 min on an H100), session 5: the mixed T=1024 step now that enqueueing no
# longer blocks (back to back = device time per step), sequential against the unpartitioned
# pipeline and the SM-partitioned one with the two-consumer Mosaic GPU attention on 44 CTAs.
# Usage (device tool, repo root): bash benchmarks/gpu_round26.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run step 560 python3 benchmarks/step_profile.py \
    --mixed_only --repeats=10 --schedule=sequential --schedule=sequential+graph \
    --schedule=nano2-pipe-nostreams+graph --schedule=nano2-pipe-nostreams-sm33-gemm67+graph
grep "^row:\|failed\|Error" "$out/step.log" | cut -c1-600

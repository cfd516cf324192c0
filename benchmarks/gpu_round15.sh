#!/usr/bin/env bash
# One short device call (~3 min on an H100), session 4: how fast the decode attention streams
# the KV cache from few SMs (persistent, 33 and 66 programs) as its tile and pipeline grow.
# Usage (device tool, repo root): bash benchmarks/gpu_round15.sh
source "$(dirname "$0")/gpu_common.sh"
for t in default pages_per_block=8 pages_per_block=8,num_stages=4 \
         pages_per_block=16,num_stages=3,num_warps=8 pages_per_block=2,num_stages=6; do
    tuning=${t/default/}
    run "attn_${t//[=,]/_}" 90 python3 benchmarks/overlap_micro.py --repeats=20 \
        --persistent_programs=33,66,132 --persistent_tuning="$tuning"
done
for f in "$out"/attn_*.log; do echo "$f"; grep "^attention alone" "$f" | cut -c1-80; done

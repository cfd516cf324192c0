#!/usr/bin/env bash
# One short device call (~2 min on an H100), session 5: is the Mosaic GPU attention bound by
# its producer's TMA issue (one copy per 16-token page, 8 per 64-token block)? The same
# 799 MB of K and V in 64-token pages (2 copies per block), two consumers.
# Usage (device tool, repo root): bash benchmarks/gpu_round28.sh
source "$(dirname "$0")/gpu_common.sh"
for page in 16 64; do
    run "page$page" 150 python3 benchmarks/overlap_micro.py --persistent_programs= \
        --page_size=$page --mgpu_attention_programs=33,44,66,132
    echo "-- page $page"
    grep "mgpu attention alone\|^attention alone" "$out/page$page.log" | cut -c1-120
    grep -m3 -B2 -A12 "Traceback" "$out/page$page.log" | grep -v "^  File\|^    " | head -20
done

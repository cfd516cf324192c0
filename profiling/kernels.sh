#!/usr/bin/env bash
# BENCHMARKS.md "Attention kernels": the copy and GEMM ceilings, the paged decode and prefill
# kernels beside their references and JAX's bundled kernels. About 3 minutes on an H200.
source "$(dirname "$0")/common.sh"
run kernels 300 python3 profiling/bench_kernels.py --kernels=ceilings,decode,prefill
sed -n '/^kernel  /,$p' "$out/kernels.log"

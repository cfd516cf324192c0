#!/usr/bin/env bash
# BENCHMARKS.md "Layer GEMMs against cuBLAS": a LLaMA-3-8B layer's GEMMs through XLA (two weight
# layouts), the persistent Mosaic GPU GEMM and torch (cuBLAS) at 512, 1024 and 2048 tokens, under
# XLA's default flags and the variants below. About 3 minutes on an H200.
source "$(dirname "$0")/common.sh"
run gemm_default 200 python3 profiling/gemm_vs_cublas.py
table gemm_default
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run gemm_no_triton 200 \
    python3 profiling/gemm_vs_cublas.py --nomgpu --label=no-triton-gemm
table gemm_no_triton

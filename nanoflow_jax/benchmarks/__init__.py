"""Benchmark support, kept apart from the serving path (nothing under nanoflow_jax imports it):

    workloads     constant-length workloads and the shipped request traces (traces/)
    timing        device time per call, the measured GEMM peak, optimal throughput
    hf_baseline   HF transformers peers: static batches and continuous batching (needs torch)
"""

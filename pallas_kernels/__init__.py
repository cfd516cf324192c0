"""Pallas kernels for nanoflow-jax, each beside its pure-jnp reference.

Serving kernels (the engine's step runs them on a GPU):
  decode_attention       paged GQA decode attention (split-K, online softmax; Triton backend).
  prefill_attention      paged causal attention over ragged prompt chunks (chunked prefill
                         with prior context).
  decode_attention_mgpu  persistent Mosaic GPU decode attention on a given number of CTAs
                         (the SM-partitioned schedules' attention).
  persistent_matmul      persistent Mosaic GPU GEMM on a given number of CTAs (the
                         SM-partitioned schedules' GEMMs).

experimental/ (measured, kept for the overlap work; no serving path uses them):
  kv_write               new tokens' K/V into their cache slots in place (the step writes with
                         `nanoflow_jax.kv_cache.write_kv`, its reference).
  fused_gemm_decode      a GEMM and decode attention in one launch, split by program id.
  gemm_attention_mgpu    a GEMM and decode attention as warpgroups of one persistent Mosaic
                         GPU kernel, both on every SM (overlap inside the SM; measured by
                         profiling/in_sm_overlap.py).
"""

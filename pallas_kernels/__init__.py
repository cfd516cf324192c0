"""Pallas kernels for nanoflow-jax, each beside its pure-jnp reference.

decode_attention:  paged GQA decode attention (split-K, online softmax).
prefill_attention: paged causal attention over ragged prompt chunks
                   (chunked prefill with prior context).
kv_write:          new tokens' K/V into their cache slots in place (reference:
                   `nanoflow_jax.kv_cache.write_kv`, which the step still uses).
fused_gemm_decode: a GEMM and decode attention in one launch (overlap experiment).
"""

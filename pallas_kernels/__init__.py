"""Pallas kernels for nanoflow-jax, each beside its pure-jnp reference.

decode_attention:  paged GQA decode attention (split-K, online softmax).
prefill_attention: paged causal attention over ragged prompt chunks
                   (chunked prefill with prior context).
"""

"""Input checks shared by the paged attention kernels (decode, prefill, Mosaic GPU decode)."""
from __future__ import annotations


def check_paged_inputs(q, k_pages, v_pages, sm_scale: float, *, pow2: bool = True) -> None:
    """q [..., Hq, D] against a K/V cache [Hkv, P, page_size, D]: equal K and V shapes, one head
    size, whole GQA groups, a positive scale; `pow2`: page_size and D powers of two (the
    Triton kernels' block shapes need it)."""
    num_q_heads, head_dim = q.shape[-2:]
    num_kv_heads, _, page_size, head_dim_k = k_pages.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} != v_pages {v_pages.shape}")
    if head_dim_k != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"bad shapes: q {q.shape}, k_pages {k_pages.shape}")
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    if pow2 and (page_size & (page_size - 1) or head_dim & (head_dim - 1)):
        raise ValueError("page_size and head_dim must be powers of two")

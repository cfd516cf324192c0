"""Timing in device time, the measured compute ceiling and NanoFlow's optimal throughput."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def device_ms_per_call(fn, *args, calls: int = 10, repeats: int = 10) -> float:
    """Median ms per call of `fn(*args)` over `repeats` timings, each of `calls` calls enqueued
    back to back and blocked once: device time per call, without the host's launch and sync
    between calls (`calls=1` blocks on every call, and counts them). One warm-up call first."""
    if calls < 1 or repeats < 1:
        raise ValueError(f"calls and repeats must be >= 1, got {calls} and {repeats}")
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * float(np.median(times))


def sustained_ms_per_call(fn, *args, calls: int) -> float:
    """ms per call of `calls` calls of `fn(*args)` enqueued back to back and blocked once, each
    output dropped when the next call is enqueued (`device_ms_per_call` keeps them all, too
    many for seconds of calls: an up/gate GEMM's output is 58 MB)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls * 1e3


def measure_peak_flops(n: int | None = None, repeats: int = 10, calls: int = 10) -> float:
    """bf16 GEMM FLOP/s measured in this process (the ceiling of 'optimal throughput'), in
    device time (`device_ms_per_call`)."""
    on_gpu = jax.default_backend() == "gpu"
    n = n or (8192 if on_gpu else 1024)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (n, n), dtype)
    b = jax.random.normal(keys[1], (n, n), dtype)
    ms = device_ms_per_call(jax.jit(lambda a, b: a @ b), a, b, calls=calls, repeats=repeats)
    return 2 * n**3 / (ms / 1e3)


def optimal_tokens_per_s(peak_flops: float, param_count: int) -> float:
    """NanoFlow's ceiling: every token costs 2·P FLOPs, at the measured GEMM peak."""
    return peak_flops / (2 * param_count)


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")

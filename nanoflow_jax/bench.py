"""What the benchmark scripts share: workloads, the measured compute ceiling, optimal throughput."""
from __future__ import annotations

import csv
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TRACE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "workloads")
TRACES = ("splitwise", "lmsys", "sharegpt")


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_len: int
    output_len: int
    arrival_s: float = 0.0  # seconds after the first request (traces with timestamps)


def load_workload(spec: str, num_requests: int, max_model_len: int, seed: int = 0,
                  trace_dir: str = DEFAULT_TRACE_DIR) -> list[Request]:
    """`const:IN:OUT` or `trace:NAME`; prompts clipped so prompt + output fits max_model_len."""
    kind, _, rest = spec.partition(":")
    if kind == "const":
        try:
            n_in, n_out = (int(x) for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"const workload is const:IN:OUT, got {spec!r}") from None
        rows = [(n_in, n_out, 0.0)] * num_requests
    elif kind == "trace":
        if rest not in TRACES:
            raise ValueError(f"unknown trace {rest!r}; traces: {', '.join(TRACES)}")
        path = os.path.join(trace_dir, f"{rest}.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"trace file {path!r} not found (set --trace_dir)")
        with open(path) as f:
            table = list(csv.DictReader(f))
        pick = np.random.default_rng(seed).choice(len(table), num_requests, replace=False)
        rows = [(int(table[i]["ContextTokens"]), int(table[i]["GeneratedTokens"]), 0.0)
                for i in sorted(pick)]
    else:
        raise ValueError(f"workload must be const:IN:OUT or trace:NAME, got {spec!r}")
    out = []
    for n_in, n_out, t in rows:
        n_out = max(1, min(n_out, max_model_len - 1))
        out.append(Request(max(1, min(n_in, max_model_len - n_out)), n_out, t))
    return out


def prompt_token_ids(requests: list[Request], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of the requested lengths (speed does not depend on the token values)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, r.prompt_len).tolist() for r in requests]


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


def measure_peak_flops(n: int | None = None, repeats: int = 10, calls: int = 10) -> float:
    """bf16 GEMM FLOP/s measured in this process (the ceiling of 'optimal throughput'), in
    device time (`device_ms_per_call`). Until session 6 each product was blocked on its own;
    on an H100 that moved the ceiling little (659-717 TFLOP/s then, 681-708 since)."""
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

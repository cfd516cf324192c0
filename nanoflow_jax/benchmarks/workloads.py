"""Benchmark workloads: constant lengths or samples of the shipped request traces."""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

DEFAULT_TRACE_DIR = os.path.join(os.path.dirname(__file__), "traces")  # README.md there
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



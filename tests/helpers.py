"""Shared test utilities."""
import os

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN_MODELS = ("llama", "mistral", "qwen2")


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, name)


def random_seed() -> int:
    """A fresh seed per run (print it on failure to reproduce)."""
    return int.from_bytes(os.urandom(4), "little")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

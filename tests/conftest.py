"""Tests run on the CPU: Pallas kernels in interpret mode, tiny model configs."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

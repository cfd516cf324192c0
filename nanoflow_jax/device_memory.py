"""The device memory the engine may take (minimal form; the engine sizes its cache from it)."""
import os


def reserve_device_memory(fraction: float) -> None:
    """Let XLA's GPU allocator hold `fraction` of the device; call before JAX starts a backend."""
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:g}"

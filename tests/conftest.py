"""Tests run on the CPU: Pallas kernels in interpret mode, tiny model configs.

Tests marked `eight_devices` (tensor parallelism) need 8 CPU devices, a number XLA fixes when
JAX starts. The rest of the suite runs on one device, so in a process with fewer than 8 each
marked test runs in a child pytest with --xla_force_host_platform_device_count=8; set that flag
in XLA_FLAGS yourself to run them in one process.

Mosaic GPU's interpreter runs each warpgroup of a CTA as an XLA CPU execution that blocks in
host callbacks while it waits on a barrier. Those executions share the PJRT CPU client's thread
pool, whose size is PJRT_NPROC (else NPROC, else the number of cores): with 2 threads a kernel
of five warpgroups (tests/test_gemm_attention_mgpu.py) hangs, with 4 it runs. XLA reads the
variable when JAX creates its CPU client, so it is set here, before any test starts JAX.
"""
import os
import subprocess
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


def pytest_configure(config):
    config.addinivalue_line("markers", "eight_devices: needs 8 JAX devices (run in a child "
                                       "process when this one has fewer)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("eight_devices") is None:
        return None
    import jax

    if jax.device_count() >= 8:
        return None
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES}")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
        cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True,
        check=False)
    if child.returncode != 0:
        pytest.fail(f"in a child process with 8 devices:\n{child.stdout[-8000:]}"
                    f"{child.stderr[-2000:]}", pytrace=False)
    return True

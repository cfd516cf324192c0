"""profiling/bench_kernels.py runs end to end (tiny shapes, interpret mode) and checks its kernels."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_kernels_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "profiling/bench_kernels.py", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "bench_kernels.log").read_text()
    for kernel in ("gemm_bf16", "copy", "decode pallas", "prefill pallas", "kv_write"):
        assert kernel in log
    # Every kernel row carries its error against the reference: all small.
    errs = [float(line.split()[-1]) for line in log.splitlines()
            if line.startswith(("decode pallas", "prefill pallas", "kv_write"))]
    assert errs and max(errs) < 1e-2

"""The scripts' engine flags: generated from EngineConfig, the same everywhere, --help exits 0."""
import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from nanoflow_jax import cli
from nanoflow_jax.config import EngineConfig
from nanoflow_jax.parallel import DistributedConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["serve.py", "generate.py", "benchmark_throughput.py", "benchmark_serving.py"]


def _help(script: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return "".join(proc.stdout.split())  # absl wraps lines, at spaces and at hyphens


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {script: _help(script) for script in SCRIPTS}


def test_every_script_shows_every_engine_flag_with_its_one_help(helps):
    for cls in (EngineConfig, DistributedConfig):
        for field in dataclasses.fields(cls):
            text = "".join(f"--{field.name}: {field.metadata['help']}".split())
            for script, out in helps.items():
                assert text in out, (script, field.name)


def test_flags_build_the_engine_config():
    fv = flags.FlagValues()
    cli.define_engine_flags(fv)
    fv(["prog", "--model=tiny-qwen2", "--max_num_seqs=7", "--gpu_memory_utilization=0.5",
        "--schedule=nano2"])
    config = cli.engine_config(fv)
    assert (config.model, config.max_num_seqs, config.gpu_memory_utilization,
            config.schedule) == ("tiny-qwen2", 7, 0.5, "nano2")
    assert config.max_num_batched_tokens is None  # left to start-up
    assert cli.engine_flags_set(fv) == {"model": "tiny-qwen2", "max_num_seqs": 7,
                                        "gpu_memory_utilization": 0.5, "schedule": "nano2"}
    assert cli.engine_config(fv, max_num_seqs=3).max_num_seqs == 3


def test_a_bad_knob_is_one_line_naming_it():
    fv = flags.FlagValues()
    cli.define_engine_flags(fv)
    fv(["prog", "--gpu_memory_utilization=1.5"])
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        cli.engine_config(fv)


def test_knobs_left_to_start_up_resolve_by_backend():
    cpu, gpu = EngineConfig().for_backend("cpu"), EngineConfig().for_backend("gpu")
    assert (cpu.dtype, cpu.max_num_batched_tokens, cpu.min_bucket) == ("float32", 128, 32)
    assert (gpu.dtype, gpu.max_num_batched_tokens, gpu.min_bucket) == ("bfloat16", 1024, 16)
    assert cpu.token_buckets() == (32, 64, 128)
    assert EngineConfig(dtype="float16").for_backend("gpu").dtype == "float16"

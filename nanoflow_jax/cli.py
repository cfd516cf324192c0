"""What every command-line entry point shares: the engine's flags and the process set-up.

The engine flags are generated from `EngineConfig`'s fields (name, type, default and help
are defined there, once), so `serve.py`, `generate.py` and the benchmarks show the same flags
with the same help:

    from nanoflow_jax import cli
    cli.define_engine_flags()
    def main(argv):
        cli.setup()                       # logging, device memory share, compilation cache
        config = cli.engine_config()      # EngineConfig from the flags
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing

from absl import flags

from nanoflow_jax.config import EngineConfig

FLAGS = flags.FLAGS
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanoflow_jax")

flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "log level")
flags.DEFINE_string("compilation_cache_dir", DEFAULT_CACHE_DIR,
                    "JAX's persistent compilation cache: a later start-up with the same model "
                    "and knobs loads the compiled programs instead of compiling ('' turns it off)")


def _define(field: dataclasses.Field, flag_values: flags.FlagValues) -> None:
    hints = typing.get_type_hints(EngineConfig)
    kind = hints[field.name]
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              bool: flags.DEFINE_bool}[base]
    define(field.name, field.default, field.metadata["help"], flag_values=flag_values)


def define_engine_flags(flag_values: flags.FlagValues = FLAGS, exclude: tuple[str, ...] = ()
                        ) -> None:
    """One flag per EngineConfig field (minus `exclude`), with its type, default and help."""
    for field in dataclasses.fields(EngineConfig):
        if field.name not in exclude and field.name not in flag_values:
            _define(field, flag_values)


def engine_config(flag_values: flags.FlagValues = FLAGS, **overrides) -> EngineConfig:
    """The EngineConfig the flags describe; `overrides` replace fields the script fixes."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(EngineConfig)
              if f.name in flag_values}
    return EngineConfig(**{**values, **overrides})


def engine_flags_set(flag_values: flags.FlagValues = FLAGS) -> dict[str, typing.Any]:
    """The engine flags given on the command line (to pass on to another process)."""
    return {f.name: flag_values[f.name].value for f in dataclasses.fields(EngineConfig)
            if f.name in flag_values and flag_values[f.name].present}


def setup_logging(level: str = "info") -> None:
    """One log format for the project, absl and uvicorn; no alarming noise from backend
    probing ('Unable to initialize backend tpu' is JAX looking for platforms that are not
    there)."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    logging.getLogger("nanoflow_jax").setLevel(level.upper())


def enable_compilation_cache(cache_dir: str) -> None:
    """JAX's persistent compilation cache under `cache_dir` (every program, however quick to
    compile: the CPU's many small ones add up)."""
    if not cache_dir:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def setup(config: EngineConfig | None = None, flag_values: flags.FlagValues = FLAGS) -> None:
    """Before JAX starts its backend: logging, the device memory share, the compilation cache."""
    from nanoflow_jax import device_memory

    setup_logging(flag_values.log_level)
    if config is not None:
        device_memory.reserve_device_memory(config.gpu_memory_utilization)
    enable_compilation_cache(flag_values.compilation_cache_dir)


def run(main) -> None:
    """`absl.app.run(main)`, except that --help exits with status 0 (absl exits with 1)."""
    from absl import app

    asked_help = any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?")
                     for a in sys.argv[1:])
    try:
        app.run(main)
    except SystemExit as e:
        if asked_help and e.code == 1:
            sys.exit(0)
        raise

"""The one spot that hides JAX-version differences for the Pallas kernels.

Checked against jax 0.10.2 (CPU machines) and jax 0.11.2 (GPU machines): both
export `jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)`,
`load` / `store` with masks, and `pl.dot`. On 0.11 the Triton backend is
deprecated and emits a `DeprecationWarning` ("jax-pallas-triton") at lowering
time; we silence that one warning here so logs stay readable.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

# Triton-backend names (same in 0.10.2 and 0.11.2).
load = plgpu.load
store = plgpu.store
# `pl.dot` is gone from the public `pl` namespace in 0.11.2 (deprecation
# accelerated); the Triton module re-exports the same primitive in both.
dot = plgpu.dot

warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")
warnings.filterwarnings("ignore", message=".*jax-pallas-triton.*")


def exp2(x, *, fast: bool):
    """2**x in fp32.  fast=True: one `ex2.approx.ftz.f32` (PTX inline asm, GPU only).

    Pallas lowers jnp.exp2 to libdevice `__nv_exp2f`, which XLA compiles without
    flush-to-zero, i.e. with extra denormal handling around MUFU.EX2.
    """
    if not fast:
        return jnp.exp2(x)
    (y,) = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return y


def triton_params(num_warps: int, num_stages: int):
    """Compiler params for `pl.pallas_call` on the Pallas Triton backend."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on H100/H200)."""
    try:
        dev = jax.devices()[0]
        n = getattr(dev, "core_count", None)
        if dev.platform == "gpu" and n:
            return int(n)
    except Exception:  # pragma: no cover - defensive
        pass
    return 132


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def mosaic_gpu_interpret_params():
    """`interpret=` value that runs a Mosaic GPU kernel (`plgpu.kernel`) on the CPU.

    JAX 0.10.2 and 0.11 keep the GPU interpreter's params class private
    (`InterpretGPUParams`); a later public name is preferred when present.
    """
    from jax.experimental.pallas import mosaic_gpu as mgpu

    cls = getattr(mgpu, "InterpretParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()


def mgpu_load(ref, layout):
    """A Mosaic GPU shared-memory ref loaded into registers of `layout`. JAX 0.10 takes the
    index as a positional argument; 0.11 deprecates it (index the ref instead)."""
    import inspect

    from jax.experimental.pallas import mosaic_gpu as mgpu

    idx = inspect.signature(mgpu.load).parameters["idx"]
    if idx.default is inspect.Parameter.empty:  # 0.10: the index is required
        return mgpu.load(ref, (), layout=layout)
    return mgpu.load(ref, layout=layout)

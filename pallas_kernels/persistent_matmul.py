"""GEMM on a fixed number of CTAs (Mosaic GPU, Hopper), and its reference.

NanoFlow overlaps a compute-bound GEMM with memory-bound decode attention by giving each a
share of the SMs. A cuBLAS GEMM launches one CTA per output tile, so it takes every SM until
its last wave; nothing can run beside it. This GEMM is persistent: `num_programs` CTAs loop
over the output tiles, so the other `num_sms - num_programs` SMs stay free for a kernel
launched beside it.

The kernel body is JAX's own warp-specialised Hopper matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`: TMA loads into swizzled shared memory,
WGMMA on two compute warpgroups, a producer warpgroup, a tiled TMA epilogue). It is already
persistent (`plgpu.nd_loop` hands output tiles to the grid's CTAs round robin); its public
`matmul` launches one CTA per SM, and this module launches it on `num_programs` CTAs.
Rows are zero-padded up to the CTA tile and sliced off again, so any token count works.

Runs on the CPU through Mosaic GPU's interpreter (`interpret=True`, tests only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _compat

try:  # Mosaic GPU is part of jax; the import only fails on very old versions.
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as _hopper
except ImportError:  # pragma: no cover
    plgpu = _hopper = None


@dataclasses.dataclass(frozen=True)
class MatmulTiling:
    """How the GEMM is cut: each of a CTA's two compute warpgroups computes a tile_m × tile_n
    block, side by side along N (a 128 × 256 CTA tile by default) or along M with
    `wg_split_m`; K advances tile_k at a time with `max_concurrent_steps` steps in flight in
    shared memory. `grid_tile_width` groups output tiles for L2 reuse.

    The default fits 227 KiB of shared memory: 4 x (128x64 + 64x256) x 2 B + epilogue 32 KiB."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 4
    wg_split_m: bool = False
    grid_tile_width: int = 1

    @property
    def cta_tile(self) -> tuple[int, int]:
        if self.wg_split_m:
            return 2 * self.tile_m, self.tile_n
        return self.tile_m, 2 * self.tile_n

    def hopper_config(self):
        dim = _hopper.MatmulDimension
        return _hopper.TuningConfig(
            tile_m=self.tile_m, tile_n=self.tile_n, tile_k=self.tile_k,
            max_concurrent_steps=self.max_concurrent_steps,
            epi_tile_m=min(64, self.tile_m), epi_tile_n=min(64, self.tile_n),
            grid_minor_dim=dim.N, grid_tile_width=self.grid_tile_width,
            wg_dimension=dim.M if self.wg_split_m else dim.N,
        )


def persistent_matmul(
    a: jax.Array,  # [M, K]
    b: jax.Array,  # [K, N]
    *,
    num_programs: int | None = None,
    tiling: MatmulTiling = MatmulTiling(),
    interpret: bool = False,
) -> jax.Array:  # [M, N], a.dtype; fp32 accumulation
    """a @ b on `num_programs` CTAs (None: one per SM). N must be a multiple of the CTA
    tile's N and K of tile_k (every LLaMA projection is); M is padded."""
    if plgpu is None:  # pragma: no cover
        raise NotImplementedError("this jax has no Mosaic GPU Pallas backend")
    if a.dtype != b.dtype:
        raise ValueError(f"operand dtypes differ: {a.dtype} vs {b.dtype}")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"contracting dims differ: {a.shape} @ {b.shape}")
    cta_m, cta_n = tiling.cta_tile
    if n % cta_n or k % tiling.tile_k:
        raise ValueError(f"N={n} must divide by {cta_n} and K={k} by {tiling.tile_k}")
    num_tiles = -(-m // cta_m) * (n // cta_n)
    programs = min(num_programs or _compat.num_sms(), num_tiles)
    if programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    m_pad = -(-m // cta_m) * cta_m
    a_padded = jnp.pad(a, ((0, m_pad - m), (0, 0))) if m_pad != m else a
    call = plgpu.kernel(
        functools.partial(_hopper.kernel, config=tiling.hopper_config()),
        out_type=jax.ShapeDtypeStruct((m_pad, n), a.dtype),
        grid=(programs,),
        grid_names=("cluster_grid",),
        cluster=(1,),
        cluster_names=("cluster",),
        num_threads=3,  # two compute warpgroups and one TMA producer
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_compat.mosaic_gpu_interpret_params() if interpret else None,
    )
    out = call(a_padded, b, None)  # None: no C to accumulate into
    return out[:m] if m_pad != m else out


def persistent_matmul_reference(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)

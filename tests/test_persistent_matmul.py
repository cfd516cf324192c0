"""Persistent Mosaic GPU GEMM (Mosaic GPU interpreter on the CPU) vs the jnp reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.persistent_matmul import (MatmulTiling, persistent_matmul,
                                              persistent_matmul_reference)

SMALL = MatmulTiling(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2)


def _operands(m, k, n):
    ka, kb = jax.random.split(jax.random.key(m * 7 + n))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.bfloat16)
    b = (jax.random.normal(kb, (k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    return a, b


@pytest.mark.parametrize("m,num_programs,tiling", [
    (128, 1, SMALL),  # one CTA loops over all 4 output tiles
    (100, 3, SMALL),  # rows padded to the tile; 2 x 2 tiles over 3 CTAs (uneven)
    (64, 2, MatmulTiling(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2,
                         wg_split_m=True)),  # warpgroups split M: CTA tile 128 x 64
])
def test_matches_reference(m, num_programs, tiling):
    a, b = _operands(m, 128, 256)
    got = persistent_matmul(a, b, num_programs=num_programs, tiling=tiling, interpret=True)
    want = persistent_matmul_reference(a, b)
    assert got.shape == want.shape == (m, 256) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_rejects_shapes_the_tiles_do_not_cover():
    a, b = _operands(64, 128, 96)
    with pytest.raises(ValueError, match="N=96"):
        persistent_matmul(a, b, tiling=SMALL, interpret=True)
    with pytest.raises(ValueError, match="contracting"):
        persistent_matmul(a, b[:64], tiling=SMALL, interpret=True)

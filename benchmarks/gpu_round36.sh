#!/usr/bin/env bash
# One device call (~4 min on an H100), session 6: overlap inside each SM instead of across SMs?
# The persistent GEMM with a small shared-memory footprint (128 x 128 CTA tiles, 2 K steps in
# flight, ~80 KB) and the Mosaic GPU attention with one consumer and a 2-block ring (~85 KB),
# both on all 132 SMs in one concurrent graph: where registers allow, a GEMM CTA and an
# attention CTA share each SM. ptxas's register counts first (MOSAIC_GPU_DUMP_PTXAS).
# Usage (device tool, repo root): bash benchmarks/gpu_round36.sh
source "$(dirname "$0")/gpu_common.sh"
python3 -c "from jax.experimental.pallas import mosaic_gpu as p; import jax; print('JAX', jax.__version__, 'plgpu.mma:', hasattr(p, 'mma'))"
MOSAIC_GPU_DUMP_PTXAS=1 run ptxas 120 python3 - <<'PY'
import functools, jax, jax.numpy as jnp
from pallas_kernels.persistent_matmul import persistent_matmul, MatmulTiling
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu
a = jnp.ones((512, 4096), jnp.bfloat16); b = jnp.ones((4096, 28672), jnp.bfloat16)
for t in (MatmulTiling(), MatmulTiling(tile_n=64, max_concurrent_steps=2)):
    print("GEMM", t, flush=True)
    jax.block_until_ready(jax.jit(functools.partial(persistent_matmul, tiling=t))(a, b))
q = jnp.ones((150, 32, 128), jnp.bfloat16); k = jnp.zeros((8, 150 * 82, 16, 128), jnp.bfloat16)
tab = jnp.zeros((150, 82), jnp.int32); lens = jnp.full((150,), 1300, jnp.int32)
for kw in ({"consumers": 2, "stages": 4}, {"consumers": 1, "stages": 2}):
    print("attention", kw, flush=True)
    jax.block_until_ready(jax.jit(functools.partial(decode_attention_mgpu, sm_scale=0.1, **kw))(
        q, k, k, tab, lens))
PY
grep -i "^GEMM\|^attention\|registers\|spill\|smem" "$out/ptxas.log" | head -30
show() {
    grep "|\|rel err" "$out/$1.log" | grep -v "^streams\|^GEMM on\|^attention on" | cut -c1-200
    grep -m3 -B2 -A12 "Traceback" "$out/$1.log" | grep -v "^  File\|^    " | head -30
}
small="--mgpu_tiling=tile_n=64,max_concurrent_steps=2 --mgpu_attention_tuning=consumers=1,stages=2"
run upgate 200 python3 benchmarks/overlap_micro.py --persistent_programs= $small \
    --pairs=132:132,88:132,132:66
echo "-- up/gate GEMM"; show upgate
run chain 200 python3 benchmarks/overlap_micro.py --persistent_programs= --chain $small \
    --pairs=132:132,88:132
echo "-- chain"; show chain

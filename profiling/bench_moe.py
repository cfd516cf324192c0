r"""Times the mixture-of-experts GEMMs in device time: grouped GEMMs over the routed tokens
against dense GEMMs of the same FLOPs.

At the steady-state routed shapes (T tokens, each sent to k of E experts; a model preset gives
D, F, E, k: Mixtral 8x7B by default on a GPU, so 1024 tokens x top-2 of 8, D=4096, F=14336):
  gate_up   [T·k, D] x [E, D, 2F] grouped by expert, for each impl in --impls
  down      [T·k, F] x [E, F, D]  grouped
  dense     the same products with ONE weight matrix: the same FLOPs, 1/E of the weight bytes
  block     the whole MoE block of one layer (router, sort, gather, both grouped GEMMs,
            combine, shared expert) against a dense SwiGLU MLP of the same FLOPs
Each row gives the median ms per call, TFLOP/s, and the floor of reading the operands once at
--hbm_tbps (all E experts' weights for a grouped GEMM: at T=1024 Mixtral's expert GEMMs are
close to memory-bound). Routing: every token picks k distinct experts uniformly at random
(seeded), so each expert gets about T·k/E rows. Every grouped GEMM is checked against the
"xla" impl before it is timed.

impls: "xla" = jax.lax.ragged_dot (on a GPU, XLA rewrites it into a dense dot over all E
groups, E times the FLOPs, unless XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true
and cuDNN >= 9.22 make it a cuDNN grouped GEMM); "mosaic" = JAX's Hopper kernel
(jax.experimental.pallas.ops.gpu.ragged_dot_mgpu, sm_90 only; the engine's default there).

  python3 profiling/bench_moe.py
  python3 profiling/bench_moe.py --model=qwen2-57b-a14b --tokens=1024,2048,4096
  JAX_PLATFORMS=cpu python3 profiling/bench_moe.py --model=tiny-mixtral --tokens=64   # CPU check

JSON lines go to $OUT/bench_moe.jsonl when OUT is set.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from nanoflow_jax.config import get_preset
from nanoflow_jax.models import moe

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "MoE preset (default: mixtral-8x7b on a GPU, tiny-mixtral "
                    "elsewhere)")
flags.DEFINE_list("tokens", None, "dense batch sizes T (default: 1024 on a GPU, 64 elsewhere)")
flags.DEFINE_list("impls", None, "grouped GEMM impls (default: mosaic,xla on an sm_90 GPU, "
                  "xla elsewhere)")
flags.DEFINE_string("dtype", "bfloat16", "operand dtype")
flags.DEFINE_bool("block", True, "also time the whole MoE block against a dense MLP")
flags.DEFINE_float("hbm_tbps", 4.0, "HBM bandwidth for the memory floor (H200: ~4.0 measured)")
flags.DEFINE_integer("calls", 10, "calls per timing, enqueued back to back")
flags.DEFINE_integer("repeats", 10, "timings (median)")
flags.DEFINE_integer("seed", 0, "routing and weights")
flags.DEFINE_list("tiles", [], "extra tilings of the mosaic grouped GEMM to time beside the "
                  "engine's, each BLOCK_M:BLOCK_N:BLOCK_K:STEPS (pipeline stages)")

_ROWS = []


def emit(row: dict) -> None:
    _ROWS.append(row)
    ms, flops, floor = row["ms"], row["flops"], row["floor_ms"]
    print(f"{row['what']:<8} {row['impl']:<7} T={row['tokens']:<6} {ms:9.3f} ms "
          f"{flops / ms / 1e9:8.2f} TFLOP/s  floor {floor:8.3f} ms  err {row['err']:.1e}",
          flush=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def uniform_routing(tokens: int, k: int, num_experts: int, rng) -> np.ndarray:
    """Group sizes [E] of T tokens each sent to k distinct experts drawn uniformly."""
    picks = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :k]
    return np.bincount(picks.reshape(-1), minlength=num_experts).astype(np.int32)


def tilings() -> list[dict]:
    """--tiles as keyword arguments of moe.mosaic_grouped_matmul."""
    out = []
    for spec in FLAGS.tiles:
        parts = [int(p) for p in spec.split(":")]
        if len(parts) != 4:
            raise app.UsageError(f"--tiles: {spec!r} is not BLOCK_M:BLOCK_N:BLOCK_K:STEPS")
        out.append(dict(zip(("block_m", "block_n", "block_k", "steps"), parts)))
    return out


def time_ms(fn, *args) -> float:
    return device_ms_per_call(jax.jit(fn), *args, calls=FLAGS.calls, repeats=FLAGS.repeats)


def bench_gemms(cfg, tokens: int, impls, dtype, rng, key) -> None:
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    k = cfg.num_experts_per_tok
    m, itemsize = tokens * k, jnp.dtype(dtype).itemsize
    sizes = jnp.asarray(uniform_routing(tokens, k, e, rng))
    keys = jax.random.split(key, 4)
    for what, (kdim, ndim), kx, kw in (("gate_up", (d, 2 * f), keys[0], keys[1]),
                                       ("down", (f, d), keys[2], keys[3])):
        x = jax.random.normal(kx, (m, kdim), dtype)
        w = (jax.random.normal(kw, (e, kdim, ndim), dtype) * kdim**-0.5).astype(dtype)
        flops = 2 * m * kdim * ndim
        grouped_floor = (e * kdim * ndim + m * (kdim + ndim)) * itemsize / FLAGS.hbm_tbps / 1e9
        want = jax.jit(lambda x, w, s: moe.grouped_matmul(x, w, s, "xla"))(x, w, sizes)
        for impl in impls:
            fn = lambda x, w, s, impl=impl: moe.grouped_matmul(x, w, s, impl)  # noqa: E731
            err = rel_err(jax.jit(fn)(x, w, sizes), want)
            emit(dict(what=what, impl=impl, tokens=tokens, ms=time_ms(fn, x, w, sizes),
                      flops=flops, floor_ms=grouped_floor, err=err, group_sizes=sizes.tolist()))
        for tile in tilings():
            fn = lambda x, w, s, tile=tile: moe.mosaic_grouped_matmul(x, w, s, **tile)  # noqa: E731
            try:
                err = rel_err(jax.jit(fn)(x, w, sizes), want)
                ms = time_ms(fn, x, w, sizes)
            except Exception as failure:  # a tiling the kernel or the shared memory cannot take
                print(f"{what} tiles {tile}: {type(failure).__name__}: {str(failure)[:200]}",
                      flush=True)
                continue
            emit(dict(what=what, impl="m{block_m}n{block_n}k{block_k}s{steps}".format(**tile),
                      tokens=tokens, ms=ms, flops=flops, floor_ms=grouped_floor, err=err))
        w0 = w[0]
        dense_floor = (kdim * ndim + m * (kdim + ndim)) * itemsize / FLAGS.hbm_tbps / 1e9
        emit(dict(what=what, impl="dense", tokens=tokens, ms=time_ms(jnp.matmul, x, w0),
                  flops=flops, floor_ms=dense_floor, err=0.0))
        del x, w, w0, want


def bench_block(cfg, tokens: int, impls, dtype, key) -> None:
    """One layer's whole MoE block (random router, so routing is the model's own) against a
    dense SwiGLU MLP of F = k·F_expert + F_shared: the same FLOPs in its GEMMs."""
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    k, fs = cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size
    keys = iter(jax.random.split(key, 16))

    def rand(shape, fan_in):
        return (jax.random.normal(next(keys), shape, jnp.float32) * fan_in**-0.5).astype(dtype)

    layer = {"router": rand((d, e), d), "experts_gate_up": rand((e, d, 2 * f), d),
             "experts_down": rand((e, f, d), f)}
    if fs:
        layer.update(shared_gate_up=rand((d, 2 * fs), d), shared_down=rand((fs, d), fs),
                     shared_gate=rand((d, 1), d))
    h = jax.random.normal(next(keys), (tokens, d), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    flops = 2 * tokens * 3 * d * (k * f + fs)
    weight_bytes = sum(x.size for x in layer.values()) * itemsize
    want = jax.jit(lambda lay, h: moe.moe_block(lay, h, cfg, impl="xla"))(layer, h)
    for impl in impls:
        fn = lambda lay, h, impl=impl: moe.moe_block(lay, h, cfg, impl=impl)  # noqa: E731
        err = rel_err(jax.jit(fn)(layer, h), want)
        emit(dict(what="block", impl=impl, tokens=tokens, ms=time_ms(fn, layer, h), flops=flops,
                  floor_ms=weight_bytes / FLAGS.hbm_tbps / 1e9, err=err))
    del layer
    f_eq = k * f + fs
    dense = {"w_gate_up": rand((d, 2 * f_eq), d), "w_down": rand((f_eq, d), f_eq)}
    emit(dict(what="block", impl="dense", tokens=tokens,
              ms=time_ms(lambda w, h: moe.swiglu(h @ w["w_gate_up"]) @ w["w_down"], dense, h),
              flops=flops, floor_ms=3 * d * f_eq * itemsize / FLAGS.hbm_tbps / 1e9, err=0.0))


def main(argv):
    del argv
    on_gpu = jax.default_backend() == "gpu"
    name = FLAGS.model or ("mixtral-8x7b" if on_gpu else "tiny-mixtral")
    cfg = get_preset(name)
    if not cfg.num_experts:
        raise app.UsageError(f"--model={FLAGS.model} is not a mixture-of-experts preset")
    dtype = jnp.dtype(FLAGS.dtype)
    default = moe.default_gemm_impl(dtype, cfg.hidden_size, 2 * cfg.moe_intermediate_size)
    impls = FLAGS.impls or (["mosaic", "xla"] if default == "mosaic" else ["xla"])
    for impl in impls:
        if impl not in moe.GEMM_IMPLS:
            raise app.UsageError(f"--impls: unknown {impl!r}; impls: {moe.GEMM_IMPLS}")
    tokens = [int(t) for t in FLAGS.tokens or (["1024"] if on_gpu else ["64"])]
    print(f"{cfg.architecture}: E={cfg.num_experts} k={cfg.num_experts_per_tok} "
          f"D={cfg.hidden_size} F={cfg.moe_intermediate_size} "
          f"F_shared={cfg.shared_expert_intermediate_size} {dtype.name} on "
          f"{jax.devices()[0].device_kind}; engine default impl: {default}", flush=True)
    rng = np.random.default_rng(FLAGS.seed)
    key = jax.random.key(FLAGS.seed)
    for t in tokens:
        bench_gemms(cfg, t, impls, dtype, rng, jax.random.fold_in(key, t))
        if FLAGS.block:
            bench_block(cfg, t, impls, dtype, jax.random.fold_in(jax.random.fold_in(key, t), 1))
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_moe.jsonl"), "w") as f:
            for row in _ROWS:
                f.write(json.dumps(dict(row, model=name)) + "\n")


if __name__ == "__main__":
    app.run(main)

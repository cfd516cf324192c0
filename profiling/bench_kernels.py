r"""Times the Pallas attention kernels beside their baselines and the chip's ceilings.

On a GPU, in ONE process:
  * ceilings: a large device-to-device copy (bytes read + written / time) and a
    large bf16 GEMM (8192^3 by default);
  * decode: our paged decode kernel (several tuning variants), the jnp
    reference under jax.jit, and JAX's bundled
    jax.experimental.pallas.ops.gpu.paged_attention (same [Hkv, P, ps, D] layout);
  * prefill: our paged prefill kernel (variants), the jnp reference, and
    cuDNN flash attention on contiguous K/V as an outside point of comparison.
Each kernel is checked against the reference before it is timed.

Timing: warm-up, then `--repeats` samples; a sample dispatches `--inner` calls
back to back (rotating among `--input_sets` input sets) and waits on the last
(block_until_ready); we report the median of the per-call times.

Throughput: decode counts bytes = K+V actually read (sum of lengths * Hkv * D
* 2 * itemsize) + q + out, reported in TB/s against the measured copy
bandwidth.  Prefill (one causal sequence of T tokens) counts only unmasked
FLOPs: 4 * T * T / 2 * Hq * D, in TFLOP/s against the measured GEMM rate.

  python3 profiling/bench_kernels.py
  python3 profiling/bench_kernels.py --kernels=decode \
      --decode_shapes=256x1024,64x4096 --decode_variants='ppb=4,w=4,s=3;ppb=8,w=8,s=2'
  JAX_PLATFORMS=cpu python3 profiling/bench_kernels.py --smoke   # tiny, interpret mode

Full logs (JSON lines + the table) go to $OUT if that env var is set.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
)
from pallas_kernels.prefill_attention import (
    prefill_attention,
    prefill_attention_reference,
)

FLAGS = flags.FLAGS
flags.DEFINE_list("kernels", ["ceilings", "decode", "prefill", "kv_write"], "what to run")
flags.DEFINE_list("kv_write_tokens", ["1024", "8192"], "tokens written per call (kv_write)")
flags.DEFINE_integer("kv_write_pages", 16384, "pages of the cache written into (kv_write)")
flags.DEFINE_list("kv_write_tpp", ["1", "2", "4", "8"],
                  "tokens_per_program of the Pallas KV write, one row each (kv_write)")
flags.DEFINE_list("decode_shapes", ["256x1024", "64x4096"], "BATCHxCONTEXT")
flags.DEFINE_list("prefill_tokens", ["4096"], "T of one causal sequence")
flags.DEFINE_integer("num_q_heads", 32, "Hq")
flags.DEFINE_integer("num_kv_heads", 8, "Hkv")
flags.DEFINE_integer("head_dim", 128, "D")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_string("dtype", "bfloat16", "bfloat16 or float32")
flags.DEFINE_string(
    "decode_variants",
    "ppb=4,w=4,s=4,fg=1;ppb=4,w=4,s=4,fg=0;ppb=4,w=4,s=3,fg=1;ppb=8,w=4,s=3,fg=1",
    "';'-separated variants: ppb (pages per block), sp (num_splits), w (warps), "
    "s (stages), fg (flat_gather 0/1)",
)
flags.DEFINE_string(
    "prefill_variants",
    "bq=128,bk=64,w=4,s=2,fe=1,fg=1;bq=128,bk=64,w=4,s=2,fe=1,fg=0;"
    "bq=128,bk=64,w=4,s=2,fe=0,fg=1;bq=128,bk=64,w=4,s=3,fe=1,fg=1;"
    "bq=128,bk=128,w=8,s=2,fe=1,fg=1;bq=128,bk=128,w=4,s=2,fe=1,fg=1",
    "';'-separated variants: bq (block_q), bk (block_k), w (warps), s (stages), "
    "fe (fast_exp2 0/1), fg (flat_gather 0/1)",
)
flags.DEFINE_bool("baselines", True, "also time the jnp reference and bundled/cuDNN kernels")
flags.DEFINE_integer("gemm_n", 8192, "GEMM ceiling: n x n x n bf16")
flags.DEFINE_integer("copy_mib", 1024, "copy ceiling: MiB read (and written)")
flags.DEFINE_integer("warmup", 3, "untimed calls")
flags.DEFINE_integer("repeats", 15, "timed samples (median)")
flags.DEFINE_integer("inner", 10, "calls per sample")
flags.DEFINE_integer("input_sets", 2, "input sets rotated among calls")
flags.DEFINE_bool("smoke", False, "tiny shapes in interpret mode (CPU check of this script)")

_LOG = []


def log(msg: str):
    print(msg, flush=True)
    _LOG.append(msg)


def bench(fn, arg_sets) -> float:
    """Median seconds per call."""
    out = None
    for i in range(FLAGS.warmup):
        out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    samples = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        for i in range(FLAGS.inner):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / FLAGS.inner)
    return statistics.median(samples)


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def parse_variants(spec: str):
    names = {
        "ppb": "pages_per_block",
        "sp": "num_splits",
        "w": "num_warps",
        "s": "num_stages",
        "bq": "block_q",
        "bk": "block_k",
        "fe": "fast_exp2",
        "fg": "flat_gather",
    }
    out = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        kw = {}
        for kv in item.split(","):
            k, v = kv.split("=")
            kw[names[k.strip()]] = int(v)
        out.append((item, kw))
    return out


ROWS = []  # (kernel, shape, ms, rate, unit, pct, err)


def row(kernel, shape, sec, rate, unit, ceiling, err=None):
    pct = 100.0 * rate / ceiling if ceiling else float("nan")
    ROWS.append((kernel, shape, sec * 1e3, rate, unit, pct, err))
    log(
        json.dumps(
            dict(
                kernel=kernel,
                shape=shape,
                ms=sec * 1e3,
                rate=rate,
                unit=unit,
                pct_of_ceiling=pct,
                rel_err=err,
            )
        )
    )


def ceilings():
    key = jax.random.key(0)
    n = FLAGS.gemm_n
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    gemm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    t = bench(gemm, [(a, b)])
    tflops = 2 * n**3 / t / 1e12
    row("gemm_bf16", f"{n}^3", t, tflops, "TFLOP/s", None)
    del a, b
    elems = FLAGS.copy_mib * 2**20 // 4
    xs = [jax.random.uniform(jax.random.key(i), (elems,), jnp.float32) for i in range(2)]
    copy = jax.jit(lambda x: x + 1.0)
    t = bench(copy, [(x,) for x in xs])
    tbs = 2 * elems * 4 / t / 1e12
    row("copy", f"{FLAGS.copy_mib}MiB r+w", t, tbs, "TB/s", None)
    del xs
    return tflops, tbs


def make_decode_inputs(seed, batch, ctx, dtype):
    hq, hkv, d, ps = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size
    pages_per_seq = -(-ctx // ps)
    num_pages = batch * pages_per_seq + 7
    rng = np.random.default_rng(seed)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (batch, hq, d), dtype)
    kp = jax.random.normal(k2, (hkv, num_pages, ps, d), dtype)
    vp = jax.random.normal(k3, (hkv, num_pages, ps, d), dtype)
    pt = jnp.asarray(
        rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq), jnp.int32
    )
    lens = jnp.full((batch,), ctx, jnp.int32)
    return q, kp, vp, pt, lens


def run_decode(copy_tbs):
    dtype = jnp.dtype(FLAGS.dtype)
    d = FLAGS.head_dim
    sm_scale = d**-0.5
    interp = FLAGS.smoke
    for shape in FLAGS.decode_shapes:
        batch, ctx = map(int, shape.split("x"))
        sets = [make_decode_inputs(100 + i, batch, ctx, dtype) for i in range(FLAGS.input_sets)]
        q, kp, vp, pt, lens = sets[0]
        nbytes = (
            int(np.sum(np.asarray(lens))) * FLAGS.num_kv_heads * d * 2 * dtype.itemsize
            + 2 * q.size * dtype.itemsize
        )
        label = f"B{batch}xL{ctx} Hq{FLAGS.num_q_heads}/Hkv{FLAGS.num_kv_heads} D{d} ps{FLAGS.page_size}"
        ref_fn = jax.jit(lambda *a: decode_attention_reference(*a, sm_scale=sm_scale))
        ref = ref_fn(*sets[0])
        if FLAGS.baselines:
            t = bench(ref_fn, sets)
            row("decode jnp-ref (jit)", label, t, nbytes / t / 1e12, "TB/s", copy_tbs, 0.0)
            try:
                from jax.experimental.pallas.ops.gpu import paged_attention as bundled

                bfn = jax.jit(
                    lambda q, kp, vp, pt, lens: bundled.paged_attention(
                        q * jnp.asarray(sm_scale, q.dtype), kp, vp, pt, lens, interpret=interp
                    )
                )
                err = rel_err(bfn(*sets[0]), ref)
                t = bench(bfn, sets)
                row(
                    "decode jax-bundled paged_attention",
                    label,
                    t,
                    nbytes / t / 1e12,
                    "TB/s",
                    copy_tbs,
                    err,
                )
            except Exception as e:  # keep going: the baseline is optional
                log(f"bundled paged_attention failed: {type(e).__name__}: {e}")
        for name, kw in parse_variants(FLAGS.decode_variants):
            try:
                fn = jax.jit(
                    lambda *a, kw=kw: decode_attention(
                        *a, sm_scale=sm_scale, interpret=interp, **kw
                    )
                )
                err = rel_err(fn(*sets[0]), ref)
                t = bench(fn, sets)
                row(f"decode pallas [{name}]", label, t, nbytes / t / 1e12, "TB/s", copy_tbs, err)
            except Exception as e:
                log(f"decode variant {name} failed: {type(e).__name__}: {e}")
                log(traceback.format_exc()[-2000:])
        del sets, q, kp, vp, pt, lens, ref


def make_prefill_inputs(seed, t_tokens, dtype):
    hq, hkv, d, ps = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size
    pages = -(-t_tokens // ps)
    num_pages = pages + 5
    rng = np.random.default_rng(seed)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (t_tokens, hq, d), dtype)
    kp = jax.random.normal(k2, (hkv, num_pages, ps, d), dtype)
    vp = jax.random.normal(k3, (hkv, num_pages, ps, d), dtype)
    pt = jnp.asarray(rng.permutation(num_pages)[:pages].reshape(1, pages), jnp.int32)
    qs = jnp.array([0, t_tokens], jnp.int32)
    sl = jnp.array([t_tokens], jnp.int32)
    return q, kp, vp, pt, qs, sl


def run_prefill(gemm_tflops):
    dtype = jnp.dtype(FLAGS.dtype)
    hq, hkv, d = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim
    sm_scale = d**-0.5
    interp = FLAGS.smoke
    for tok in FLAGS.prefill_tokens:
        t_tokens = int(tok)
        sets = [make_prefill_inputs(200 + i, t_tokens, dtype) for i in range(FLAGS.input_sets)]
        flops = 4 * t_tokens * t_tokens / 2 * hq * d
        label = f"T{t_tokens} causal Hq{hq}/Hkv{hkv} D{d} ps{FLAGS.page_size}"
        ref_fn = jax.jit(lambda *a: prefill_attention_reference(*a, sm_scale=sm_scale))
        ref = ref_fn(*sets[0])
        if FLAGS.baselines:
            t = bench(ref_fn, sets)
            row("prefill jnp-ref (jit)", label, t, flops / t / 1e12, "TFLOP/s", gemm_tflops, 0.0)
            if not interp:
                try:  # contiguous K/V, cuDNN flash attention: an outside point of comparison

                    def contig(q, kp, vp, pt, qs, sl):
                        k = kp[:, pt[0]].reshape(hkv, -1, d)[:, :t_tokens].transpose(1, 0, 2)
                        v = vp[:, pt[0]].reshape(hkv, -1, d)[:, :t_tokens].transpose(1, 0, 2)
                        return q[None], k[None], v[None]

                    csets = [jax.jit(contig)(*s) for s in sets]
                    cfn = jax.jit(
                        lambda q, k, v: jax.nn.dot_product_attention(
                            q, k, v, scale=sm_scale, is_causal=True, implementation="cudnn"
                        )[0]
                    )
                    err = rel_err(cfn(*csets[0]), ref)
                    t = bench(cfn, csets)
                    row(
                        "prefill cuDNN flash (contiguous KV)",
                        label,
                        t,
                        flops / t / 1e12,
                        "TFLOP/s",
                        gemm_tflops,
                        err,
                    )
                    del csets
                except Exception as e:
                    log(f"cuDNN attention failed: {type(e).__name__}: {str(e)[:300]}")
        for name, kw in parse_variants(FLAGS.prefill_variants):
            try:
                fn = jax.jit(
                    lambda *a, kw=kw: prefill_attention(
                        *a, sm_scale=sm_scale, interpret=interp, **kw
                    )
                )
                err = rel_err(fn(*sets[0]), ref)
                t = bench(fn, sets)
                row(
                    f"prefill pallas [{name}]",
                    label,
                    t,
                    flops / t / 1e12,
                    "TFLOP/s",
                    gemm_tflops,
                    err,
                )
            except Exception as e:
                log(f"prefill variant {name} failed: {type(e).__name__}: {str(e)[:500]}")
                log(traceback.format_exc()[-2000:])
        del sets, ref


def run_kv_write(copy_tbs):
    """T new tokens' K and V into random slots of a donated cache: XLA's scatter
    (`kv_cache.write_kv`) and the Pallas kernel (one row per --kv_write_tpp), each jitted
    with the cache donated, on the same inputs from the same random cache contents.

    Bytes = K and V of the new tokens read + written (2 * 2 * T * Hkv * D * itemsize).
    relerr: the scatter row, its written rows against K; the Pallas rows, the share of
    cache elements (K and V) that differ from the scatter's result: 0 = bit-exact.
    """
    from nanoflow_jax.kv_cache import write_kv
    from pallas_kernels.experimental.kv_write import write_kv_pallas

    dtype = jnp.dtype(FLAGS.dtype)
    hkv, d, ps = FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size
    pages = FLAGS.kv_write_pages
    shape = (hkv, pages, ps, d)
    fresh = jax.jit(lambda: tuple(jax.random.normal(jax.random.key(i), shape, dtype)
                                  for i in (7, 8)))  # same contents on every call
    num_diff = jax.jit(lambda a, b: jnp.sum(a != b))

    def timed(write, kp, vp, *args):
        """Median seconds per call; the cache is donated and re-threaded through the calls."""
        for _ in range(FLAGS.warmup):
            kp, vp = write(kp, vp, *args)
        jax.block_until_ready((kp, vp))
        samples = []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            for _ in range(FLAGS.inner):
                kp, vp = write(kp, vp, *args)
            jax.block_until_ready((kp, vp))
            samples.append((time.perf_counter() - t0) / FLAGS.inner)
        return statistics.median(samples), (kp, vp)

    write = jax.jit(write_kv, donate_argnums=(0, 1))
    for t_str in FLAGS.kv_write_tokens:
        t = int(t_str)
        k1, k2, k3 = jax.random.split(jax.random.key(t), 3)
        k = jax.random.normal(k1, (t, hkv, d), dtype)
        v = jax.random.normal(k2, (t, hkv, d), dtype)
        slots = jax.random.permutation(k3, pages * ps)[:t].astype(jnp.int32)
        label = f"T{t} Hkv{hkv} D{d} into {pages} pages"
        nbytes = 2 * 2 * t * hkv * d * dtype.itemsize
        ref = write(*fresh(), k, v, slots)  # compile + check
        page, off = np.asarray(slots) // ps, np.asarray(slots) % ps
        err = rel_err(np.asarray(ref[0])[:, page, off], np.swapaxes(np.asarray(k), 0, 1))
        # Rewriting the same slots is idempotent: `ref` stays the scatter's result.
        sec, ref = timed(write, *ref, k, v, slots)
        row("kv_write xla scatter (donated)", label, sec, nbytes / sec / 1e12, "TB/s",
            copy_tbs, err)
        for tpp in map(int, FLAGS.kv_write_tpp):
            name = f"kv_write pallas [tpp={tpp}] (donated)"
            try:
                pallas = jax.jit(lambda *a, tpp=tpp: write_kv_pallas(
                    *a, tokens_per_program=tpp, interpret=FLAGS.smoke), donate_argnums=(0, 1))
                out = pallas(*fresh(), k, v, slots)
                diff = sum(int(num_diff(a, b)) for a, b in zip(out, ref))
                if diff:
                    log(f"{name}: {diff} cache elements differ from the scatter's")
                sec, out = timed(pallas, *out, k, v, slots)
                row(name, label, sec, nbytes / sec / 1e12, "TB/s", copy_tbs,
                    diff / (2 * ref[0].size))
                del out
            except Exception as e:
                log(f"{name} failed: {type(e).__name__}: {str(e)[:500]}")
                log(traceback.format_exc()[-2000:])
        del ref


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.decode_shapes = ["3x40"]
        FLAGS.prefill_tokens = ["40"]
        FLAGS.kv_write_tokens, FLAGS.kv_write_pages = ["40"], 64
        FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim = 4, 2, 64
        FLAGS.page_size = 8
        FLAGS.gemm_n, FLAGS.copy_mib = 256, 1
        FLAGS.warmup, FLAGS.repeats, FLAGS.inner = 1, 1, 1
        FLAGS.decode_variants = "ppb=2,w=4,s=3;ppb=2,sp=1,w=4,s=3,fg=0"
        FLAGS.prefill_variants = "bq=16,bk=16,w=4,s=3;bq=16,bk=16,w=4,s=3,fg=0"
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}), dtype {FLAGS.dtype}")
    gemm_tflops, copy_tbs = float("nan"), float("nan")
    if "ceilings" in FLAGS.kernels:
        gemm_tflops, copy_tbs = ceilings()
    if "decode" in FLAGS.kernels:
        run_decode(copy_tbs)
    if "prefill" in FLAGS.kernels:
        run_prefill(gemm_tflops)
    if "kv_write" in FLAGS.kernels:
        run_kv_write(copy_tbs)

    lines = ["", f"{'kernel':<44} {'shape':<34} {'ms':>8} {'rate':>16} {'%ceil':>6} {'relerr':>8}"]
    for k, s, ms, rate, unit, pct, err in ROWS:
        e = "" if err is None else f"{err:.1e}"
        lines.append(f"{k:<44} {s:<34} {ms:8.4f} {rate:9.3f} {unit:<7}{pct:6.1f} {e:>8}")
    lines.append(
        "ceilings: copy = bytes read + written / time; gemm = 2 n^3 / time. "
        "decode TB/s = (K+V bytes of lengths + q + out) / time; prefill TFLOP/s "
        "= 4*T*T/2*Hq*D / time (unmasked causal FLOPs)."
    )
    for line in lines:
        log(line)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_kernels.log"), "w") as f:
            f.write("\n".join(_LOG) + "\n")


if __name__ == "__main__":
    app.run(main)

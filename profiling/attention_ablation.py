"""The Mosaic GPU decode attention on a share of the SMs, in device time per call. (GPU)

    python3 profiling/attention_ablation.py --programs=33,44,132 \
        --tunings="consumers=2;consumers=1,stages=6"

The paged decode attention of `--decodes` sequences of `--context` tokens (LLaMA-3-8B heads,
16-token pages scattered at random), run by `decode_attention_mgpu` on each CTA count for each
tuning (`;`-separated key=int lists of its keyword arguments), checked against the Triton
kernel, beside two ceilings: the Triton kernel on the full grid and an XLA copy of the same K
and V bytes (read + write counted, as METHOD.md says).

Where the kernel's time goes is measured by removing part of each consumer's work per KV
block and timing what is left (docs/overlap.md gives the numbers: with no math at all the
consumers still cap the kernel from few CTAs); a tuning key the kernel does not take fails.

Timing: `--calls` calls dispatched back to back and blocked once (device time per call, no
host gaps), median over `--repeats`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu

flags.DEFINE_integer("decodes", 150, "sequences")
flags.DEFINE_integer("context", 1300, "tokens of context per sequence")
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_list("programs", ["44", "132"], "CTA counts")
flags.DEFINE_string("tunings", "consumers=2", "';'-separated key=int lists of "
                    "decode_attention_mgpu's keyword arguments")
flags.DEFINE_integer("calls", 20, "calls per timing, dispatched back to back")
flags.DEFINE_integer("repeats", 5, "timings; the median is reported")
F = flags.FLAGS


def _time(fn, *args) -> float:
    return device_ms_per_call(fn, *args, calls=F.calls, repeats=F.repeats)


def main(argv):
    del argv
    hq, hkv, dh, page = 32, 8, 128, F.page_size
    b, ctx = F.decodes, F.context
    keys = jax.random.split(jax.random.key(0), 3)
    pages_per = -(-ctx // page)
    num_pages = b * pages_per
    k_pages = jax.random.normal(keys[0], (hkv, num_pages, page, dh), jnp.bfloat16)
    v_pages = jax.random.normal(keys[1], (hkv, num_pages, page, dh), jnp.bfloat16)
    tables = jnp.asarray(np.random.default_rng(0).permutation(num_pages).reshape(b, pages_per),
                         jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = jax.random.normal(keys[2], (b, hq, dh), jnp.bfloat16)
    args = (q, k_pages, v_pages, tables, lengths)
    kv_bytes = 2 * b * ctx * hkv * dh * 2

    rows = []
    copy = jax.jit(lambda k, v: (k + 0, v + 0))
    ms = _time(copy, k_pages, v_pages)
    rows.append(("XLA copy of K and V (read + write)", "-", ms, 2 * k_pages.nbytes * 2 / ms / 1e9))
    triton = jax.jit(functools.partial(decode_attention, sm_scale=dh**-0.5))
    ms = _time(triton, *args)
    rows.append(("Triton kernel, full grid", "-", ms, kv_bytes / ms / 1e9))
    want = triton(*args).astype(jnp.float32)
    errors = {}
    for tuning in F.tunings.split(";"):
        kwargs = {k: int(v) for k, v in (kv.split("=") for kv in tuning.split(",") if kv)}
        for p in map(int, F.programs):
            fn = jax.jit(functools.partial(decode_attention_mgpu, sm_scale=dh**-0.5,
                                           num_programs=p, **kwargs))
            try:
                ms = _time(fn, *args)
            except Exception as e:  # a tuning that does not fit is a finding
                print(f"{tuning} on {p} CTAs failed: {type(e).__name__}: {str(e)[:300]}")
                ms = float("nan")
            rows.append((tuning, p, ms, kv_bytes / ms / 1e9))
            if np.isfinite(ms):
                got = fn(*args).astype(jnp.float32)
                errors[tuning, p] = float(jnp.linalg.norm((got - want).ravel())
                                          / jnp.linalg.norm(want.ravel()))
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, {b} x {ctx} tokens, "
          f"{kv_bytes / 1e6:.0f} MB of K and V")
    print("variant | CTAs | ms per call | TB/s | rel err vs Triton")
    for name, p, ms, tbs in rows:  # bytes / ms / 1e9 = TB/s
        err = errors.get((name, p))
        print(f"{name} | {p} | {ms:.3f} | {tbs:.2f} | "
              f"{'-' if err is None else f'{err:.1e}'}")


if __name__ == "__main__":
    app.run(main)

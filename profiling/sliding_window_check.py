r"""On a GPU: sliding-window attention, checked and timed.

  1. The engine with the Pallas kernels (fp32) against HF's greedy tokens on the windowed
     goldens (tests/golden/mistral: window 16 on every layer; qwen2: on layer 1).
  2. The Triton decode and chunked-prefill kernels with a window against their jnp references
     (bf16, LLaMA-3-8B / Mistral-7B heads, contexts past the window).
  3. Device time of windowed decode over growing contexts beside full attention: a windowed
     sequence reads only its window's pages, so its time stays near full attention over
     `window` tokens while full attention grows with the context. The same for a prompt chunk
     after a long context.

    PYTHONPATH=. python3 profiling/sliding_window_check.py
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 profiling/sliding_window_check.py --smoke  # tiny

Full logs (JSON lines) go to $OUT when set; the table comes last.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference

FLAGS = flags.FLAGS
flags.DEFINE_integer("window", 4096, "sliding window (Mistral-7B-v0.1: 4096)")
flags.DEFINE_list("contexts", ["4096", "16384", "32768"], "decode context lengths timed")
flags.DEFINE_integer("batch", 64, "decode sequences")
flags.DEFINE_integer("chunk", 2048, "prefill chunk: the last tokens of a contexts[-1] sequence")
flags.DEFINE_integer("num_q_heads", 32, "Hq")
flags.DEFINE_integer("num_kv_heads", 8, "Hkv")
flags.DEFINE_integer("head_dim", 128, "D")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_bool("smoke", False, "tiny shapes, kernels in interpret mode (runs on the CPU)")

LOG = []


def emit(**rec):
    LOG.append(rec)
    print(json.dumps(rec), flush=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cache(key, num_pages):
    shape = (FLAGS.num_kv_heads, num_pages, FLAGS.page_size, FLAGS.head_dim)
    kk, kv = jax.random.split(key)
    return (jax.random.normal(kk, shape, jnp.bfloat16),
            jax.random.normal(kv, shape, jnp.bfloat16))


def decode_inputs(batch, ctx):
    pages = -(-ctx // FLAGS.page_size)
    k, v = cache(jax.random.key(ctx), batch * pages)
    q = jax.random.normal(jax.random.key(1), (batch, FLAGS.num_q_heads, FLAGS.head_dim),
                          jnp.bfloat16)
    perm = jax.random.permutation(jax.random.key(2), batch * pages).astype(jnp.int32)
    return q, k, v, perm.reshape(batch, pages), jnp.full((batch,), ctx, jnp.int32)


def prefill_inputs(ctx, chunk):
    pages = -(-ctx // FLAGS.page_size)
    k, v = cache(jax.random.key(ctx + 1), pages)
    q = jax.random.normal(jax.random.key(3), (chunk, FLAGS.num_q_heads, FLAGS.head_dim),
                          jnp.bfloat16)
    pt = jax.random.permutation(jax.random.key(4), pages).astype(jnp.int32)[None]
    return (q, k, v, pt, jnp.array([0, chunk], jnp.int32), jnp.array([ctx], jnp.int32))


def _kw(**kw):  # kernel kwargs: interpret mode under --smoke
    return dict(kw, interpret=FLAGS.smoke)


def _ms(fn, *args):
    n = 1 if FLAGS.smoke else 10
    return device_ms_per_call(jax.jit(fn), *args, calls=n, repeats=n)


def check_kernels(window, scale):
    args = decode_inputs(8, 3 * window + 5)
    lens = jnp.array([1, window, window + 1, 0, 2 * window + 7, 3 * window + 5, 17, window - 3],
                     jnp.int32)
    args = args[:4] + (lens,)
    out = decode_attention(*args, **_kw(sm_scale=scale, window=window))
    ref = jax.jit(decode_attention_reference, static_argnames=("sm_scale", "window"))(
        *args, sm_scale=scale, window=window)
    emit(check="decode", window=window, rel_err=rel_err(out, ref))
    chunk = min(1000, FLAGS.chunk)
    args = prefill_inputs(2 * window + chunk, chunk)
    out = prefill_attention(*args, **_kw(sm_scale=scale, window=window))
    ref = jax.jit(prefill_attention_reference, static_argnames=("sm_scale", "window"))(
        *args, sm_scale=scale, window=window)
    emit(check="prefill", window=window, rel_err=rel_err(out, ref))


def time_kernels(window, scale):
    kv_bytes = 2 * FLAGS.num_kv_heads * FLAGS.head_dim * 2  # K and V of one token, bf16
    for ctx in map(int, FLAGS.contexts):
        args = decode_inputs(FLAGS.batch, ctx)
        for w in (window, None):
            ms = _ms(lambda *a, w=w: decode_attention(*a, **_kw(sm_scale=scale, window=w)), *args)
            read = FLAGS.batch * min(ctx, w or ctx) * kv_bytes
            emit(time="decode", window=w, context=ctx, batch=FLAGS.batch, ms=ms,
                 tb_per_s=read / ms / 1e9)
        del args
    ctx = int(FLAGS.contexts[-1])
    args = prefill_inputs(ctx, FLAGS.chunk)
    for w in (window, None):
        ms = _ms(lambda *a, w=w: prefill_attention(*a, **_kw(sm_scale=scale, window=w)), *args)
        emit(time="prefill", window=w, context=ctx, chunk=FLAGS.chunk, ms=ms)


def check_engine():
    from nanoflow_jax import LLM, SamplingParams

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "golden")
    for name in ("mistral", "qwen2"):
        g = np.load(os.path.join(root, name, "greedy.npz"))
        n = 1 if FLAGS.smoke else len([k for k in g if k.startswith("prompt_")])
        impl = "interpret" if FLAGS.smoke else "pallas"
        llm = LLM(os.path.join(root, name), dtype="float32", attention_impl=impl,
                  max_num_batched_tokens=32, min_bucket=16, page_size=16, num_pages=256)
        outs = llm.generate([{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in range(n)],
                            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)
        same = sum(o.outputs[0].token_ids == g[f"output_{i}"].tolist()
                   for i, o in enumerate(outs))
        emit(check="engine", golden=name, identical=same, of=n)


def main(_):
    if FLAGS.smoke:
        for name, value in (("window", 8), ("contexts", ["16", "40"]), ("batch", 2),
                            ("chunk", 16), ("num_q_heads", 4), ("num_kv_heads", 2),
                            ("head_dim", 32)):
            setattr(FLAGS, name, value)
    window, scale = FLAGS.window, FLAGS.head_dim ** -0.5
    check_engine()  # first: the engine reserves XLA's memory pool before JAX starts
    check_kernels(window, scale)
    time_kernels(window, scale)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "sliding_window_check.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in LOG)
    print(f"\n{'what':<34}{'result':>30}")
    for r in LOG:
        if "check" in r and "rel_err" in r:
            what, res = f"{r['check']} kernel vs reference", f"rel err {r['rel_err']:.1e}"
        elif "check" in r:
            what, res = f"engine greedy = HF ({r['golden']})", f"{r['identical']}/{r['of']}"
        else:
            shape = (f"B={r['batch']}" if r["time"] == "decode" else f"chunk={r['chunk']}")
            what = f"{r['time']} ctx={r['context']} {shape} w={r['window']}"
            res = f"{r['ms']:.3f} ms" + (f" {r['tb_per_s']:.2f} TB/s" if "tb_per_s" in r
                                         else "")
        print(f"{what:<34}{res:>30}")


if __name__ == "__main__":
    app.run(main)

"""Power, SM clock and energy of the step's two kinds of work, alone and together. (GPU)

    OUT=$OUT PYTHONPATH=. python3 profiling/power_draw.py        # ~1.5 min on an H200

LLaMA-3-8B shapes: the up/gate GEMM of `--tokens` rows (XLA's dot) and the decode attention of
`--decodes` sequences of `--context` tokens (the Triton kernel; 16-token pages at random). Each
program runs back to back for `--seconds` under `PowerSampler`; the table gives the time per
call, the mean power and SM clock, and the energy per call. Programs:
  gemm        the GEMM alone
  attention   the attention alone
  in turn     the GEMM, then the attention (one program: the sequential step's order)
  in-SM       both in one kernel on every SM (`gemm_beside_attention`, the insm schedule's)
The H200 runs these at its power limit, lowering the SM clock as the draw rises, so a program
that runs both kinds of work at once saves time only as far as it saves energy: compare the
J/call column. NVML's power reading is an average over about a second, so over runs of a few
seconds the watts include the ramp from idle (the clock readings are instantaneous): compare
joules between rows, not with the step's. Full log in $OUT/power_draw.log.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.power import PowerSampler
from nanoflow_jax.benchmarks.timing import sustained_ms_per_call
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.experimental.gemm_attention_mgpu import gemm_beside_attention

flags.DEFINE_integer("tokens", 1024, "GEMM rows")
flags.DEFINE_integer("decodes", 300, "sequences of the decode attention")
flags.DEFINE_integer("context", 1300, "tokens of each sequence")
flags.DEFINE_float("seconds", 3.0, "back-to-back seconds per program under the sampler")
F = flags.FLAGS

HIDDEN, FFN2, HQ, HKV, D, PAGE = 4096, 2 * 14336, 32, 8, 128, 16


def _inputs():
    rng = np.random.default_rng(0)
    pages_per = -(-F.context // PAGE)
    num_pages = F.decodes * pages_per
    key = jax.random.key(0)
    a = jax.random.normal(key, (F.tokens, HIDDEN), jnp.bfloat16)
    b = jax.random.normal(key, (HIDDEN, FFN2), jnp.bfloat16) * HIDDEN**-0.5
    q = jax.random.normal(key, (F.decodes, HQ, D), jnp.bfloat16)
    k = jax.random.normal(key, (HKV, num_pages, PAGE, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(1), (HKV, num_pages, PAGE, D), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(num_pages).reshape(F.decodes, pages_per), jnp.int32)
    lengths = jnp.full((F.decodes,), F.context, jnp.int32)
    return a, b, q, k, v, tables, lengths


def _programs():
    scale = D**-0.5

    def attention(q, k, v, tables, lengths):
        return decode_attention(q, k, v, tables, lengths, sm_scale=scale)

    return {
        "gemm": jax.jit(lambda a, b, *_: a @ b),
        "attention": jax.jit(lambda a, b, q, k, v, t, n: attention(q, k, v, t, n)),
        "in turn": jax.jit(lambda a, b, q, k, v, t, n: (a @ b, attention(q, k, v, t, n))),
        "in-SM": jax.jit(lambda a, b, q, k, v, t, n: gemm_beside_attention(
            a, b, q, k, v, t, n, sm_scale=scale)),
    }


def main(argv):
    del argv
    out_dir = os.environ.get("OUT", "profiling_out")
    os.makedirs(out_dir, exist_ok=True)
    args = _inputs()
    rows = []
    for name, fn in _programs().items():
        jax.block_until_ready(fn(*args))  # compile
        n = max(10, round(F.seconds / (sustained_ms_per_call(fn, *args, calls=10) / 1e3)))
        with PowerSampler() as power:
            ms = sustained_ms_per_call(fn, *args, calls=n)
        rows.append((name, ms, power.watts, power.sm_mhz, len(power.samples)))
        print(f"row: {rows[-1]}", flush=True)
    lines = [f"{jax.devices()[0].device_kind}, jax {jax.__version__}; up/gate GEMM of "
             f"{F.tokens} rows, decode attention of {F.decodes} x {F.context} tokens",
             "program | ms/call | W | SM MHz | J/call | samples"]
    for name, ms, watts, mhz, samples in rows:
        if watts is None:
            lines.append(f"{name} | {ms:.3f} | - | - | - | 0")
        else:
            lines.append(f"{name} | {ms:.3f} | {watts:.0f} | {mhz:.0f} | "
                         f"{watts * ms / 1e3:.3f} | {samples}")
    with open(os.path.join(out_dir, "power_draw.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

"""Variants of the KV-cache write, each checked and timed over a step's layers in device time.

    PYTHONPATH=. python3 profiling/kv_write_check.py           # GPU, ~3 min on an H200
    PYTHONPATH=. python3 profiling/kv_write_check.py --smoke   # tiny shapes, CPU, no trace

`kv_cache.write_kv` puts T tokens' K and V ([T, Hkv, D]) into the cache ([Hkv, P, page_size,
D] each) with two XLA scatters. Without a promise that the windows are distinct, XLA's GPU
scatter emitter (as its source reads) stores every element with an atomic, and a 16-bit
atomic store has no instruction (XLA maps only f32 and 32/64-bit integer stores to an atomic
exchange): each bf16 element becomes a compare-and-swap loop on its 32-bit word, which the
neighbouring element's thread contends for. That, not the 4 MB moved, is what the write
costs. The variants, all
`(k_pages, v_pages, k, v, slots) -> (k_pages, v_pages)` with `write_kv`'s result:

  xla              `write_kv(..., unique=False)`: the plain scatter, the reference
  unique           `write_kv` (the engine's): the same scatter promising unique indices
                   (plain vector stores); padding rows get distinct out-of-range pages
                   (num_pages + row), so the promise holds for them too
  natural          `lax.scatter` taking K/V in their [T, Hkv, D] layout (a [Hkv, D] window
                   per token, no swapaxes), unique indices
  natural_atomic   the same without the promise: what the layout alone changes
  flat             one index per token into the [Hkv, P * page_size, D] view of the cache (a
                   bitcast), unique indices
  stacked          K and V in ONE scatter. It needs each layer's cache as one [2, Hkv, P,
                   page_size, D] array, a layout the attention kernels would have to take
                   (a slice of it handed to a kernel is a copy): timed here on caches of that
                   layout, not proposed for the package
  pallas_tN        pallas_kernels/experimental/kv_write.py: K and V in one Triton kernel,
                   N tokens per program
  unique+rope,     RoPE applied to K inside the program, as `llama.split_rope` does right
  xla+rope         before `write_kv` (whose only consumer the rotated K is): the trace's
                   kernels per layer show whether XLA fuses it into the scatter's updates

`indices_are_sorted` is no variant: decode rows point into arbitrary pages, so the slots are
not sorted, and XLA's emitter uses the flag only for scatters without unique indices.

Per T (decode rows in random pages, the first in the cache's very last slot, one prompt chunk
in consecutive slots starting mid-page, T/32 padding rows last): every variant is checked on
one layer of the full cache filled with random values, the whole cache against `xla`'s
(bit-identical; rope variants within bf16 rounding). Then one jitted program writes
`--layers` layers, each its own cache, donated, as the model step does; after its
`device_ms_per_call` timing, the written rows of its first and last layer are checked, and a
profiler trace of `--calls` calls per variant (variants apart by idle gaps) gives the device
time: the union of the kernels' intervals (busy), their summed durations, the span from the
first kernel's start to the last one's end, per layer. The table comes last; the full log,
and at T = `--hlo_tokens` the optimized HLO of each program, go to $OUT (when set).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from nanoflow_jax.config import get_preset
from nanoflow_jax.kv_cache import slot_pages, write_kv
from nanoflow_jax.models.llama import apply_rope, rope_inv_freq
from pallas_kernels.experimental.kv_write import write_kv_pallas
from profiling.trace_summary import kernel_events, summarize

flags.DEFINE_string("model", "llama-3-8b", "preset: KV heads, head_dim, layers, RoPE")
flags.DEFINE_list("tokens", ["256", "1024", "2048"], "T, tokens written per layer")
flags.DEFINE_integer("num_pages", 40000, "pages of each layer's cache")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_integer("layers", 0, "layers per program (0: the model's)")
flags.DEFINE_integer("decodes", 300, "decode rows of each batch (at most T - T/32)")
flags.DEFINE_list("variants", [], "variants to run (default: all)")
flags.DEFINE_list("pallas_tpp", ["1", "4"], "tokens per program of the Pallas variants")
flags.DEFINE_integer("calls", 10, "calls per timing and per trace")
flags.DEFINE_integer("repeats", 5, "timings of --calls calls (the median is printed)")
flags.DEFINE_integer("hlo_tokens", 1024, "T whose programs' optimized HLO goes to $OUT")
flags.DEFINE_bool("smoke", False, "tiny shapes on the CPU (Pallas in interpret mode), no trace")
F = flags.FLAGS

DROP = lax.GatherScatterMode.FILL_OR_DROP
# Operand [Hkv, P, ps, D], indices [T, 2] = (page, offset), updates [T, Hkv, D]: token t's
# [Hkv, D] window lands at [:, page, offset, :].
NATURAL = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(1, 2),
                                      scatter_dims_to_operand_dims=(1, 2))
# Operand [Hkv, P·ps, D], indices [T, 1] = slot, updates [T, Hkv, D].
FLAT = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(1,),
                                   scatter_dims_to_operand_dims=(1,))
# Operand [2, Hkv, P, ps, D] (K then V), indices [T, 2] = (page, offset), updates [T, 2, Hkv, D].
STACKED = lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3), inserted_window_dims=(2, 3),
                                      scatter_dims_to_operand_dims=(2, 3))


# ---- the variants ---------------------------------------------------------------------------


def distinct_pages(slots: jax.Array, num_pages: int, page_size: int) -> jax.Array:
    """[T, 2] (page, offset) per row, as `write_kv` computes them (`kv_cache.slot_pages`)."""
    return jnp.stack(slot_pages(slots, num_pages, page_size), axis=-1)


def write_natural(k_pages, v_pages, k, v, slots, *, unique: bool = True):
    idx = distinct_pages(slots, k_pages.shape[1], k_pages.shape[2])
    put = functools.partial(lax.scatter, scatter_indices=idx, dimension_numbers=NATURAL,
                            unique_indices=unique, mode=DROP)
    return put(k_pages, updates=k), put(v_pages, updates=v)


def write_flat(k_pages, v_pages, k, v, slots):
    heads, num_pages, page_size, dim = k_pages.shape
    rows = jnp.arange(slots.shape[0], dtype=slots.dtype)
    # Padding row t -> slot P·ps + t: out of range and distinct.
    idx = jnp.where(slots >= 0, slots, num_pages * page_size + rows)[:, None]

    def put(pages, x):
        flat = pages.reshape(heads, num_pages * page_size, dim)  # a bitcast
        return lax.scatter(flat, idx, x, FLAT, unique_indices=True, mode=DROP).reshape(
            pages.shape)

    return put(k_pages, k), put(v_pages, v)


def write_stacked(kv_pages, k, v, slots):
    """kv_pages [2, Hkv, P, ps, D] (K, V) -> the same, updated by one scatter."""
    idx = distinct_pages(slots, kv_pages.shape[2], kv_pages.shape[3])
    return lax.scatter(kv_pages, idx, jnp.stack([k, v], axis=1), STACKED, unique_indices=True,
                       mode=DROP)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    write: Callable  # (k_pages, v_pages, k, v, slots) or, stacked, (kv_pages, k, v, slots)
    stacked: bool = False  # takes the [2, Hkv, P, ps, D] cache
    rope: bool = False  # the program rotates K before the write


def all_variants(pallas_tpp=(1, 4), interpret: bool = False) -> list[Variant]:
    pallas = [Variant(f"pallas_t{n}", functools.partial(
        write_kv_pallas, tokens_per_program=n, interpret=interpret)) for n in pallas_tpp]
    return [
        Variant("xla", functools.partial(write_kv, unique=False)),
        Variant("unique", functools.partial(write_kv, unique=True)),
        Variant("natural", write_natural),
        Variant("natural_atomic", functools.partial(write_natural, unique=False)),
        Variant("flat", write_flat),
        Variant("stacked", write_stacked, stacked=True),
        *pallas,
        Variant("unique+rope", functools.partial(write_kv, unique=True), rope=True),
        Variant("xla+rope", functools.partial(write_kv, unique=False), rope=True),
    ]


def apply(var: Variant, cache, k, v, slots):
    """One layer's write: `cache` is (k_pages, v_pages), or [2, Hkv, P, ps, D] if stacked."""
    return var.write(cache, k, v, slots) if var.stacked else var.write(*cache, k, v, slots)


# ---- inputs ---------------------------------------------------------------------------------


def make_slots(rng, tokens: int, num_pages: int, page_size: int, decodes: int) -> np.ndarray:
    """[T] int32 as `batch.build_batch` lays them out: decode rows first (one token each, a
    random page and offset; the first in the cache's last slot), then one prompt chunk in
    consecutive slots of fresh pages starting mid-page, then T/32 padding rows (-1)."""
    pad = tokens // 32
    nd = min(decodes, tokens - pad)
    n = tokens - pad - nd
    start = int(rng.integers(page_size))
    chunk_pages = -(-(start + n) // page_size)
    if nd + chunk_pages > num_pages - 1:
        raise ValueError(f"--num_pages={num_pages} cannot hold T={tokens} in distinct pages")
    perm = rng.permutation(num_pages - 1)[:nd + chunk_pages]  # page P-1 is decode row 0's
    slots = np.full(tokens, -1, np.int32)
    slots[:nd] = perm[:nd] * page_size + rng.integers(page_size, size=nd)
    if nd:
        slots[0] = num_pages * page_size - 1
    pos = np.arange(start, start + n)
    slots[nd:nd + n] = perm[nd:][pos // page_size] * page_size + pos % page_size
    return slots


@jax.jit
def max_diff(a, b):
    """max |a - b| / max |b|, in f32 (0: identical)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)


@functools.partial(jax.jit, static_argnums=1)
def rows_diff(cache, which: int, x, slots):
    """max |written row - x| / max |x| over the valid rows of cache[which] (K: 0, V: 1; the
    cache a (k_pages, v_pages) pair or a stacked [2, Hkv, P, ps, D] array); x [T, Hkv, D]."""
    pages = cache[which]  # [Hkv, P, ps, D]
    valid = slots >= 0
    s = jnp.where(valid, slots, 0)
    got = jnp.swapaxes(pages[:, s // pages.shape[2], s % pages.shape[2]], 0, 1)  # [T, Hkv, D]
    diff = jnp.where(valid[:, None, None], jnp.abs(got.astype(jnp.float32) - x), 0)
    return jnp.max(diff) / jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), 1e-30)


# ---- the run --------------------------------------------------------------------------------

_LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    _LOG.append(msg)


def check_one_layer(variants, cache, k, v, slots, positions, inv_freq) -> dict[str, float]:
    """Each variant on one layer of random cache contents, not donated: max |diff| of the
    whole cache (K and V) against `write_kv`'s result."""
    want = {False: jax.jit(write_kv)(*cache, k, v, slots)}
    if any(var.rope for var in variants):
        rotated = jax.jit(lambda k, positions: apply_rope(k, positions, inv_freq))(k, positions)
        want[True] = jax.jit(write_kv)(*cache, rotated, v, slots)
    errors = {}
    for var in variants:
        def one(cache, k, v, slots, positions, var=var):
            if var.rope:
                k = apply_rope(k, positions, inv_freq)
            return apply(var, cache, k, v, slots)

        got = jax.jit(one)(jnp.stack(cache) if var.stacked else cache, k, v, slots, positions)
        errors[var.name] = max(float(max_diff(g, w)) for g, w in zip(got, want[var.rope]))
        del got
    return errors


def layers_program(var: Variant, layers: int, inv_freq):
    """jit(caches, ks [L, T, Hkv, D], vs, slots, positions) -> (caches, 0), caches donated."""
    def step(caches, ks, vs, slots, positions):
        new = []
        for layer in range(layers):
            k = ks[layer]
            if var.rope:
                k = apply_rope(k, positions, inv_freq)
            new.append(apply(var, caches[layer], k, vs[layer], slots))
        # A scalar of the same execution to block on: the caches go to the next call.
        return new, jnp.zeros((), jnp.int32)

    return jax.jit(step, donate_argnums=0)


def call_threaded(compiled, state: dict, args) -> jax.Array:
    """One call of a program that donates its caches: state["caches"] goes in, the updated
    caches come back into it; returns the scalar to block on."""
    state["caches"], done = compiled(state["caches"], *args)
    return done


def zero_caches(layers, shape, dtype, stacked):
    make = jax.jit(lambda: jnp.zeros((2, *shape) if stacked else shape, dtype))
    return [make() if stacked else (make(), make()) for _ in range(layers)]


def split_by_gaps(events, groups: int, gap_ns: float):
    """Kernel events -> `groups` lists, cut where the device idled > gap_ns; None if the
    number of groups differs."""
    out, end = [], None
    for e in sorted(events, key=lambda e: e[1]):
        if end is None or e[1] - end > gap_ns:
            out.append([])
        out[-1].append(e)
        end = e[2] if end is None else max(end, e[2])
    return out if len(out) == groups else None


def traced_kernels(work) -> list:
    """The GPU kernel events [(name, start_ns, end_ns)] while `work()` runs under a trace."""
    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp(prefix="kv_write_trace_")
    try:
        with jax.profiler.trace(folder):
            work()
        path = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
        return kernel_events(ProfileData.from_file(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trace_variants(runs, calls: int, on_gpu: bool):
    """runs: [(name, once)] -> {name: trace summary per call (+ span_ms)}: one trace, each
    variant's `calls` calls enqueued back to back, variants apart by 0.2 s of idle device
    (one trace per variant if the idle gaps do not split the kernels into the variants)."""
    if not on_gpu:
        return {}

    def calls_of(once):
        time.sleep(0.2)
        jax.block_until_ready([once() for _ in range(calls)])

    events = traced_kernels(lambda: [calls_of(once) for _, once in runs])
    groups = split_by_gaps(events, len(runs), gap_ns=50e6)
    if groups is None:
        log(f"trace: gaps do not split {len(events)} kernels into {len(runs)} variants; "
            "tracing each alone")
        groups = [traced_kernels(functools.partial(calls_of, once)) for _, once in runs]
    out = {}
    for (name, _), group in zip(runs, groups):
        if not group:
            continue
        s = summarize(group, steps=calls, top=4)
        s["span_ms"] = (max(e[2] for e in group) - min(e[1] for e in group)) * 1e-6 / calls
        out[name] = s
    return out


def main(argv):
    del argv
    _LOG.clear()
    if F.smoke:  # tiny defaults for the flags not given
        tiny = {"tokens": ["8", "40"], "num_pages": 24, "page_size": 4, "layers": 2,
                "decodes": 5, "calls": 2, "repeats": 1, "pallas_tpp": ["4"]}
        for name, value in tiny.items():
            if not F[name].present:
                setattr(F, name, value)
    cfg = get_preset(F.model)
    heads, dim = (2, 64) if F.smoke else (cfg.num_kv_heads, cfg.head_dim)
    layers = F.layers or cfg.num_layers
    inv_freq = rope_inv_freq(dataclasses.replace(cfg, head_dim=dim))
    dtype = jnp.bfloat16
    on_gpu = jax.default_backend() == "gpu"
    variants = all_variants(tuple(map(int, F.pallas_tpp)), interpret=not on_gpu)
    if F.variants:
        unknown = set(F.variants) - {v.name for v in variants}
        if unknown:
            raise ValueError(f"--variants: unknown {sorted(unknown)}; "
                             f"known {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in F.variants]
    shape = (heads, F.num_pages, F.page_size, dim)
    log(f"{jax.devices()[0].device_kind}: cache per layer 2 x {shape} {jnp.dtype(dtype).name}, "
        f"{layers} layers, T in {F.tokens}")

    rng = np.random.default_rng(0)
    tokens = [int(t) for t in F.tokens]
    cases = {t: (jnp.asarray(make_slots(rng, t, F.num_pages, F.page_size, F.decodes)),
                 jnp.asarray(rng.integers(0, 8192, t), jnp.int32)) for t in tokens}
    key = jax.random.key(0, impl="rbg")  # compiles faster than threefry
    results = {(v.name, t): {} for v in variants for t in tokens}

    # 1. Each variant against write_kv on one layer of random contents.
    cache = tuple(jax.random.normal(jax.random.fold_in(key, i), shape, dtype) for i in (1, 2))
    for t in tokens:
        slots, positions = cases[t]
        k, v = (jax.random.normal(jax.random.fold_in(key, 10 * t + i), (t, heads, dim), dtype)
                for i in (3, 4))
        for name, err in check_one_layer(variants, cache, k, v, slots, positions,
                                         inv_freq).items():
            results[name, t]["check"] = err
            log(f"check T={t} {name}: max |cache - write_kv's| / max |cache| = {err:.1e}")
    del cache

    # 2. All layers, donated, timed: the [Hkv, P, ps, D] layout, then the stacked one.
    out_dir = os.environ.get("OUT")
    rope = jax.jit(lambda k, positions: apply_rope(k, positions, inv_freq))
    for stacked in (False, True):
        group = [v for v in variants if v.stacked == stacked]
        if not group:
            continue
        state = {"caches": zero_caches(layers, shape, dtype, stacked)}
        for t in tokens:
            slots, positions = cases[t]
            ks, vs = (jax.random.normal(jax.random.fold_in(key, 100 * t + i),
                                        (layers, t, heads, dim), dtype) for i in (5, 6))
            args = (ks, vs, slots, positions)
            runs = []
            for var in group:
                t0 = time.perf_counter()
                compiled = layers_program(var, layers, inv_freq).lower(
                    state["caches"], *args).compile()
                compile_s = time.perf_counter() - t0
                if out_dir and t == F.hlo_tokens:
                    os.makedirs(os.path.join(out_dir, "kv_write_hlo"), exist_ok=True)
                    with open(os.path.join(out_dir, "kv_write_hlo", f"{var.name}.txt"), "w") as f:
                        f.write(compiled.as_text())
                once = functools.partial(call_threaded, compiled, state, args)
                r = results[var.name, t]
                r["wall_ms"] = device_ms_per_call(once, calls=F.calls, repeats=F.repeats)
                rows = []
                for layer in (0, layers - 1):
                    k = rope(ks[layer], positions) if var.rope else ks[layer]
                    for which, x in enumerate((k, vs[layer])):
                        rows.append(float(rows_diff(state["caches"][layer], which, x, slots)))
                r["rows"] = max(rows)
                log(f"time T={t} {var.name}: compiled in {compile_s:.1f} s, "
                    f"{r['wall_ms']:.3f} ms/call wall, written rows off by {r['rows']:.1e}")
                runs.append((var.name, once))
            for name, s in trace_variants(runs, F.calls, on_gpu).items():
                results[name, t]["trace"] = s
                log(f"trace T={t} {name}: {s['kernels'] / layers:.2f} kernels/layer, busy "
                    f"{s['busy_ms']:.4f} ms, kernels {s['kernel_ms']:.4f} ms, span "
                    f"{s['span_ms']:.4f} ms per call | "
                    + "; ".join(f"{n[:50]} {ms * 1e3:.1f} us" for n, ms in s["top"]))
        state.clear()  # free this layout's caches before the next one's

    nan = float("nan")
    log("")
    log(f"KV write, {layers} layers, device time per layer from a profiler trace (busy: "
        "kernels' union; span: first start to last end) and per step; wall: ms per "
        "step enqueued back to back; check: max |diff| vs write_kv (one layer, whole cache) "
        "and of the written rows (first and last layer)")
    log("variant | T | kernels/layer | busy us/layer | span us/layer | busy ms/step | "
        "wall ms/step | check")
    for t in tokens:
        for var in variants:
            r = results[var.name, t]
            s = r.get("trace", {})
            per_layer = lambda ms: ms * 1e3 / layers
            log(f"{var.name} | {t} | {s.get('kernels', nan) / layers:.2f} | "
                f"{per_layer(s.get('busy_ms', nan)):.2f} | {per_layer(s.get('span_ms', nan)):.2f}"
                f" | {s.get('busy_ms', nan):.3f} | {r.get('wall_ms', nan):.3f} | "
                f"{r.get('check', nan):.0e}, {r.get('rows', nan):.0e}")
    if out_dir:
        with open(os.path.join(out_dir, "kv_write_check.log"), "w") as f:
            f.write("\n".join(_LOG) + "\n")


if __name__ == "__main__":
    app.run(main)

"""The KV-write variants of profiling/kv_write_check.py against `kv_cache.write_kv`, on CPU.

Each is a scatter of the same rows, so each must give write_kv's cache bit for bit: padding
rows dropped, decode rows in arbitrary pages, the cache's last slot, nothing else touched.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.kv_cache import write_kv
from profiling import kv_write_check
from profiling.kv_write_check import all_variants, apply, make_slots, split_by_gaps
from tests.helpers import random_seed

# Not the reference itself; the Pallas kernel has its own test (test_kv_write.py); the rope
# variants rotate K first.
VARIANTS = [v for v in all_variants()
            if v.name != "xla" and not v.name.startswith("pallas") and not v.rope]


def _inputs(seed, tokens, num_pages, page_size, decodes, hkv=2, d=64):
    rng = np.random.default_rng(seed)
    cast = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    cache = (cast(hkv, num_pages, page_size, d), cast(hkv, num_pages, page_size, d))
    slots = jnp.asarray(make_slots(rng, tokens, num_pages, page_size, decodes))
    return cache, cast(tokens, hkv, d), cast(tokens, hkv, d), slots


@pytest.mark.parametrize("tokens,decodes", [(40, 6), (1, 1)])
@pytest.mark.parametrize("var", VARIANTS, ids=lambda v: v.name)
def test_variant_equals_write_kv(var, tokens, decodes):
    seed = random_seed()
    cache, k, v, slots = _inputs(seed, tokens, num_pages=40, page_size=4, decodes=decodes)
    want = jax.jit(write_kv)(*cache, k, v, slots)
    got = jax.jit(lambda c, k, v, s: apply(var, c, k, v, s))(
        jnp.stack(cache) if var.stacked else cache, k, v, slots)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"seed={seed}")
    # The rows where the slots say: write_kv itself is checked in test_kv_cache.py.
    s = np.asarray(slots)
    valid = s >= 0
    for g, x in zip(got, (k, v)):
        np.testing.assert_array_equal(np.asarray(g)[:, s[valid] // 4, s[valid] % 4],
                                      np.swapaxes(np.asarray(x)[valid], 0, 1), f"seed={seed}")


def test_make_slots_layout():
    s = make_slots(np.random.default_rng(0), 64, num_pages=40, page_size=4, decodes=10)
    assert s[0] == 40 * 4 - 1 and (s[-2:] == -1).all()  # the last slot; 64/32 padding rows
    real = s[s >= 0]
    assert len(set(real.tolist())) == len(real) == 62
    chunk = s[10:62]  # consecutive positions: each next slot is the next offset or a new page
    assert ((np.diff(chunk) == 1) | (chunk[1:] % 4 == 0)).all()


def test_write_kv_unique_reaches_the_hlo():
    cache = jnp.zeros((2, 5, 4, 64), jnp.bfloat16)
    k = jnp.zeros((3, 2, 64), jnp.bfloat16)
    slots = jnp.array([0, -1, 7], jnp.int32)
    for unique in (False, True):
        hlo = jax.jit(functools.partial(write_kv, unique=unique)).lower(
            cache, cache, k, k, slots).as_text(dialect="hlo")
        assert hlo.count("unique_indices=true") == 2 * unique


def test_split_by_gaps():
    events = [("a", 0, 10), ("b", 12, 30), ("c", 100, 110), ("d", 105, 200), ("e", 500, 501)]
    groups = split_by_gaps(events[::-1], 3, gap_ns=50)
    assert [[e[0] for e in g] for g in groups] == [["a", "b"], ["c", "d"], ["e"]]
    assert split_by_gaps(events, 2, gap_ns=50) is None


def test_trace_variants_splits_one_trace_or_traces_each(monkeypatch):
    ms = 1e6  # ns
    one_trace = [("s", 0, 2 * ms), ("s", 3 * ms, 5 * ms), ("p", 200 * ms, 201 * ms)]
    traces = [one_trace]
    monkeypatch.setattr(kv_write_check, "traced_kernels", lambda work: traces.pop(0))
    runs = [("scatter", None), ("pallas", None)]
    out = kv_write_check.trace_variants(runs, calls=2, on_gpu=True)
    assert out["scatter"]["kernels"] == 1 and out["scatter"]["span_ms"] == 2.5
    assert out["scatter"]["busy_ms"] == 2 and out["pallas"]["busy_ms"] == 0.5
    # Gaps too short to tell the variants apart: one trace per variant.
    traces = [[("x", 0, ms), ("x", 2 * ms, 3 * ms)], [("s", 0, 4 * ms)], [("p", 0, ms)]]
    out = kv_write_check.trace_variants(runs, calls=1, on_gpu=True)
    assert out["scatter"]["busy_ms"] == 4 and out["pallas"]["busy_ms"] == 1 and not traces


def test_script_smoke(tmp_path, monkeypatch):
    """main() end to end on tiny shapes (no trace on the CPU): the table, every row exact."""
    monkeypatch.setenv("OUT", str(tmp_path))
    flags = kv_write_check.F
    flags(["kv_write_check", "--smoke", "--variants=xla,stacked", "--tokens=40"])
    try:
        kv_write_check.main([])
    finally:
        flags.unparse_flags()
    rows = [line.split(" | ") for line in (tmp_path / "kv_write_check.log").read_text()
            .splitlines() if line.count(" | ") == 7 and not line.startswith("variant")]
    assert sorted(r[0] for r in rows) == ["stacked", "xla"] and all(r[1] == "40" for r in rows)
    assert all(r[-1] == "0e+00, 0e+00" for r in rows)  # the cache and the written rows exact

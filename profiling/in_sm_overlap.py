"""A GEMM and decode attention inside each SM (one kernel) against both on all SMs in turn. (GPU)

    OUT=$OUT/insm PYTHONPATH=. python3 profiling/in_sm_overlap.py --quick --ptxas  # ~1 min
    OUT=$OUT/insm PYTHONPATH=. python3 profiling/in_sm_overlap.py        # ~5 min on an H200
    OUT=$OUT/insm PYTHONPATH=. python3 profiling/in_sm_overlap.py --lower_only --ptxas \
        --tunings="registers=none;registers=136/128/40"     # compile only: ptxas, registers
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 profiling/in_sm_overlap.py --smoke  # CPU, ~4 min

The pairs (LLaMA-3-8B, `--tokens` rows, the decode attention of `--decodes` sequences of
`--context` tokens: 32 q heads, 8 KV heads, D = 128, 16-token pages scattered at random):
  gate_up, qkv, o, down   one layer GEMM beside the whole attention (`--quick`: gate_up only);
  layer                   the four GEMMs in turn, the attention's sequences split between them
                          in proportion to their FLOPs (four fused launches).
For each pair, device time (`--calls` calls enqueued back to back and blocked once, median of
`--repeats`; `nanoflow_jax.benchmarks.timing.device_ms_per_call`) of
  (a) the fused kernel (`pallas_kernels/experimental/gemm_attention_mgpu.py`), per
      `--tunings` entry;
      beside it the fused kernel with the attention emptied (lengths 0) and with a one-tile
      GEMM: each side inside the fused kernel alone;
  (b) XLA's dot and the attention on all SMs back to back, for the Mosaic GPU attention (its
      fastest full-grid tuning of `--attention_tunings`, measured alone) and the Triton one;
  (c) XLA's dot alone, each attention alone.
The fused outputs are checked against XLA's dot and the jnp attention before they are timed
(a wrong one shows as "X" and is not timed). The baselines and each tuning run in a child
process with `--timeout_s` (a bad register budget can hang the kernel or fail in ptxas); its
full log goes to $OUT (default profiling_out/): baseline.log, tuning_<i>.log, and
in_sm_overlap.log with the table, printed last. speedup = the faster back to back / fused.
`--ptxas` sets MOSAIC_GPU_DUMP_PTXAS=1 in the tuning children and prints ptxas's register and
spill lines per tuning; `--lower_only` compiles the fused kernels without running them.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu
from pallas_kernels.experimental.gemm_attention_mgpu import Tuning, gemm_beside_attention

flags.DEFINE_bool("quick", False, "the gate_up pair and the default tuning only")
flags.DEFINE_string("tunings", "", "';'-separated fused-kernel tunings (Tuning.parse), e.g. "
                    "'tile_n=128,gemm_stages=3;registers=136/128/40' (default: a built-in "
                    "list, the default tuning alone with --quick)")
flags.DEFINE_string("attention_tunings", "consumer=rows,consumers=2,stages=4;"
                    "consumer=swap_ab,consumers=2,stages=6;consumer=swap_ab,consumers=3,stages=6",
                    "';'-separated full-grid decode_attention_mgpu keyword arguments")
flags.DEFINE_bool("lower_only", False, "compile the fused kernels, run nothing")
flags.DEFINE_bool("ptxas", False, "MOSAIC_GPU_DUMP_PTXAS=1 in the tuning children; print the "
                  "register and spill lines")
flags.DEFINE_integer("tokens", 1024, "GEMM rows")
flags.DEFINE_integer("decodes", 300, "attention: sequences")
flags.DEFINE_integer("context", 1300, "attention: tokens of context per sequence")
flags.DEFINE_integer("calls", 10, "calls per timing, enqueued back to back")
flags.DEFINE_integer("repeats", 5, "timings per point; the median is kept")
flags.DEFINE_integer("timeout_s", 300, "seconds for one child process")
flags.DEFINE_integer("budget_s", 540, "seconds for the whole run: no child starts after it, "
                     "and none runs past it (a tuning not run shows as '-')")
flags.DEFINE_bool("smoke", False, "tiny shapes in interpret mode on the CPU (checks the script)")
flags.DEFINE_string("child", "", "internal: 'baseline' or the tuning this child process runs")
F = flags.FLAGS

GEMMS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
         "down": (14336, 4096)}  # (K, N), LLaMA-3-8B
LAYER = ("qkv", "o", "gate_up", "down")
# the default (2 stages of tile_k 128, 2 KV stages); a deeper GEMM ring of tile_k 64; the
# 3 + 3-stage ring; one GEMM consumer of 128 rows (four warpgroups: 128 registers at
# launch). Each takes ~1 min on an H200.
TUNINGS = ("", "tile_k=64,gemm_stages=4", "tile_k=64,gemm_stages=3,kv_stages=3",
           "gemm_consumers=1,tile_m=128,tile_k=64,gemm_stages=3,delay_release=1")
TOLERANCE = 2e-2  # relative L2 error of a bf16 kernel against its reference
_RESULT = "RESULT "  # a child's result lines on stdout


def _shapes():
    if F.smoke:
        return {"tokens": 64, "gemms": {"gate_up": (128, 256), "o": (128, 128)}, "hq": 4,
                "hkv": 1, "d": 64, "page": 16, "decodes": 3, "context": 40}
    return {"tokens": F.tokens, "gemms": GEMMS, "hq": 32, "hkv": 8, "d": 128, "page": 16,
            "decodes": F.decodes, "context": F.context}


def _pairs() -> list[str]:
    names = list(_shapes()["gemms"])
    return ["gate_up"] if F.quick or F.smoke else [*LAYER, "layer"] if len(names) == 4 else names


def _inputs():
    """{gemm name: (a, b)} and the attention's (q, k_pages, v_pages, tables, lengths)."""
    s = _shapes()
    keys = jax.random.split(jax.random.key(0), 8)
    gemms = {}
    for i, (name, (k, n)) in enumerate(s["gemms"].items()):
        a = jax.random.normal(keys[i], (s["tokens"], k), jnp.bfloat16)
        gemms[name] = (a, jax.random.normal(keys[4 + i % 4], (k, n), jnp.bfloat16) * k**-0.5)
    pages = -(-s["context"] // s["page"])
    num_pages = s["decodes"] * pages
    kv = jax.random.normal(keys[7], (2, s["hkv"], num_pages, s["page"], s["d"]), jnp.bfloat16)
    tables = np.random.default_rng(0).permutation(num_pages).reshape(s["decodes"], pages)
    q = jax.random.normal(keys[6], (s["decodes"], s["hq"], s["d"]), jnp.bfloat16)
    return gemms, (q, kv[0], kv[1], jnp.asarray(tables, jnp.int32),
                   jnp.full((s["decodes"],), s["context"], jnp.int32))


def _split(attn, parts: list[str]):
    """The attention's sequences split between the GEMMs `parts` in proportion to their FLOPs:
    one (q, k, v, tables, lengths) per part."""
    work = np.cumsum([0] + [np.prod(_shapes()["gemms"][p]) for p in parts])
    bounds = np.round(work / work[-1] * attn[0].shape[0]).astype(int)
    q, k, v, tables, lengths = attn
    return [(q[s:e], k, v, tables[s:e], lengths[s:e]) for s, e in itertools.pairwise(bounds)]


def _rel_err(got, want) -> float:
    got, want = (jnp.asarray(x, jnp.float32).ravel() for x in (got, want))
    return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _time(fn, *args) -> float:
    return device_ms_per_call(fn, *args, calls=F.calls, repeats=F.repeats)


def _emit(**result) -> None:
    print(_RESULT + json.dumps(result), flush=True)


def _parse_kwargs(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        out[key] = value if key == "consumer" else int(value)
    return out


def run_baseline() -> None:
    """(b) and (c): XLA's dot and each attention alone, then back to back per pair."""
    gemms, attn = _inputs()
    scale = _shapes()["d"] ** -0.5
    want = jax.jit(functools.partial(decode_attention_reference, sm_scale=scale))(*attn)
    attentions = {}
    for spec in F.attention_tunings.split(";"):
        attentions[f"mgpu {spec}"] = functools.partial(decode_attention_mgpu, sm_scale=scale,
                                                       interpret=F.smoke, **_parse_kwargs(spec))
    if not F.smoke:
        attentions["triton"] = functools.partial(decode_attention, sm_scale=scale)
    alone = {}
    for name, fn in attentions.items():
        try:
            jitted = jax.jit(fn)
            err = _rel_err(jitted(*attn), want)
            alone[name] = _time(jitted, *attn) if err < TOLERANCE else None
            _emit(kind="attention", name=name, rel_err=err, ms=alone[name])
        except Exception as e:  # noqa: BLE001 - a variant that fails is a finding
            _emit(kind="attention", name=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    mgpu = [n for n in alone if n.startswith("mgpu") and alone[n] is not None]
    best = {"mgpu": min(mgpu, key=alone.get) if mgpu else None,
            "triton": "triton" if alone.get("triton") else None}
    for name, (a, b) in gemms.items():
        _emit(kind="gemm", name=name, ms=_time(jax.jit(_dot), a, b))
    for pair in _pairs():
        parts = list(LAYER) if pair == "layer" else [pair]
        for side, attn_name in best.items():
            if attn_name is None:
                continue
            attend = attentions[attn_name]

            def b2b(gemm_args, attn_args, attend=attend):
                return [_dot(a, b) for a, b in gemm_args], attend(*attn_args)

            ms = _time(jax.jit(b2b), [gemms[p] for p in parts], attn)
            _emit(kind="b2b", pair=pair, attention=side, name=attn_name, ms=ms)


def run_fused(spec: str) -> None:
    """(a): the fused kernel of one tuning, per pair: checked, then timed with both sides and
    with each side alone."""
    tuning = Tuning.parse(spec)
    gemms, attn = _inputs()
    scale = _shapes()["d"] ** -0.5
    fused = jax.jit(functools.partial(gemm_beside_attention, sm_scale=scale, tuning=tuning,
                                      interpret=F.smoke))
    want = None
    for pair in _pairs():
        parts = list(LAYER) if pair == "layer" else [pair]
        slices = _split(attn, parts) if pair == "layer" else [attn]
        args = [(*gemms[p], *s) for p, s in zip(parts, slices)]

        def layer(args):
            return [fused(*x) for x in args]

        t0 = time.perf_counter()
        try:
            if F.lower_only:
                for x in args:
                    fused.lower(*x).compile()
                _emit(kind="fused", pair=pair, compiled_s=time.perf_counter() - t0)
                continue
            got = jax.block_until_ready(layer(args))
            if want is None:
                want = jax.jit(functools.partial(decode_attention_reference, sm_scale=scale))(
                    *attn)
            gemm_err = max(_rel_err(c, _dot(a, b)) for (c, _), (a, b, *_) in zip(got, args))
            attn_err = _rel_err(jnp.concatenate([o for _, o in got]), want)
            result = {"kind": "fused", "pair": pair, "gemm_err": gemm_err,
                      "attention_err": attn_err, "first_call_s": time.perf_counter() - t0}
            if max(gemm_err, attn_err) < TOLERANCE:
                result["ms"] = _time(jax.jit(layer), args)
            if max(gemm_err, attn_err) < TOLERANCE and pair != "layer":
                # each side inside the fused kernel alone: no KV tokens; a one-tile GEMM
                result["gemm_part_ms"] = _time(jax.jit(layer), [
                    (*x[:6], jnp.zeros_like(x[6])) for x in args])
                one = (jnp.zeros((tuning.cta_m, tuning.tile_k), jnp.bfloat16),
                       jnp.zeros((tuning.tile_k, tuning.tile_n), jnp.bfloat16))
                result["attention_part_ms"] = _time(jax.jit(layer), [(*one, *s) for s in slices])
            _emit(**result)
        except Exception as e:  # noqa: BLE001 - a tuning that fails to build is a finding
            _emit(kind="fused", pair=pair, error=f"{type(e).__name__}: {str(e)[:600]}")


def _child(name: str, spec: str, out_dir: str, timeout_s: float, log) -> list[dict]:
    """Runs this script on `spec` in a child process with a timeout; its output goes to
    $OUT/<name>.log; returns its result lines."""
    argv = [sys.executable, os.path.abspath(__file__), f"--child={spec or 'default'}"]
    argv += [f"--{f}={F[f].value}" for f in ("tokens", "decodes", "context", "calls", "repeats",
                                              "attention_tunings")]
    argv += [f"--{f}" if F[f].value else f"--no{f}" for f in ("quick", "lower_only", "smoke")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if F.smoke:  # the interpreter's warpgroups need threads (tests/conftest.py says why)
        env.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))
    if F.ptxas and spec != "baseline":
        env["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    path = os.path.join(out_dir, f"{name}.log")
    t0 = time.perf_counter()
    with open(path, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group
            proc.wait()
            rc = "timeout"
    with open(path, errors="replace") as f:
        text = f.read()
    results = [json.loads(line[len(_RESULT):]) for line in text.splitlines()
               if line.startswith(_RESULT)]
    log(f"{name} ({spec or 'default'}): rc {rc}, {time.perf_counter() - t0:.0f} s, "
        f"{len(results)} results, log {path}")
    if rc != 0:
        log("  " + "\n  ".join(text.splitlines()[-8:]))
    if F.ptxas and spec != "baseline":
        lines = sorted({re.sub(r"\s+", " ", line.strip()) for line in text.splitlines()
                        if re.search(r"registers|spill|setmaxnreg|smem", line, re.IGNORECASE)})
        log("  ptxas: " + ("\n  ptxas: ".join(lines[:12]) if lines else "no lines"))
    return results


def _table(base: list[dict], fused: dict[str, list[dict]]) -> list[str]:
    gemm_ms = {r["name"]: r["ms"] for r in base if r["kind"] == "gemm"}
    attn = {r["name"]: r.get("ms") for r in base if r["kind"] == "attention"}
    b2b = {(r["pair"], r["attention"]): r["ms"] for r in base if r["kind"] == "b2b"}
    best_mgpu = next((r["name"] for r in base if r["kind"] == "b2b"
                      and r["attention"] == "mgpu"), "-")

    def ms(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [""]
    if base:
        lines += ["(c) alone, ms: attention " + ", ".join(f"{k} {ms(v)}" for k, v in attn.items()),
                  "    XLA dot " + ", ".join(f"{k} {ms(v)}" for k, v in gemm_ms.items()),
                  (f"(b) back to back with the Mosaic GPU attention's fastest full-grid tuning "
                   f"({best_mgpu}) and with Triton's"), ""]
    lines += [(f"{'pair':<8} {'tuning':<28} {'b2b mgpu':>9} {'b2b trit':>9} {'fused':>8} "
              f"{'gemm part':>9} {'attn part':>9} {'speedup':>8}")]
    for spec, results in fused.items():
        got = {r["pair"]: r for r in results}
        for pair in _pairs():  # a pair the child never reported (a crash, a timeout): "!"
            r = got.get(pair, {"error": "no result"})
            slow = [b2b.get((pair, side)) for side in ("mgpu", "triton")]
            done = [x for x in slow if x is not None]
            if "error" in r:
                cell = "!"
            elif F.lower_only:
                cell = f"built {r.get('compiled_s', 0):.0f}s"
            else:
                cell = ms(r.get("ms")) if "ms" in r else "X"
            speed = (f"{min(done) / r['ms']:.2f}x" if done and r.get("ms") else "-")
            lines.append(f"{pair:<8} {spec or 'default':<28} {ms(slow[0]):>9} {ms(slow[1]):>9} "
                         f"{cell:>8} {ms(r.get('gemm_part_ms')):>9} "
                         f"{ms(r.get('attention_part_ms')):>9} {speed:>8}")
    lines.append("X: wrong against the reference (not timed); !: failed or no result (the "
                 "tuning's log says why); speedup: the faster back to back / fused.")
    return lines


def main(argv):
    del argv
    if F.child:
        print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
        if F.child == "baseline":
            run_baseline()
        else:
            run_fused("" if F.child == "default" else F.child)
        return
    t0 = time.perf_counter()
    out_dir = os.environ.get("OUT", "profiling_out")
    os.makedirs(out_dir, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    if F.smoke:  # the interpreter runs a CTA in seconds: one call per point, no budget
        F.calls, F.repeats, F.budget_s, F.timeout_s = 1, 1, 3600, 1800
        F.attention_tunings = "consumer=swap_ab,consumers=1,stages=2"
    specs = ([s.strip() for s in F.tunings.split(";")] if F.tunings
             else [""] if F.quick or F.smoke else list(TUNINGS))
    for spec in specs:  # a bad tuning fails here, before any child runs
        try:
            Tuning.parse(spec)
        except ValueError as e:
            raise app.UsageError(f"--tunings: {e}") from None
    def left() -> float:
        return t0 + F.budget_s - time.perf_counter()

    base = [] if F.lower_only else _child("baseline", "baseline", out_dir,
                                          min(F.timeout_s, left()), log)
    fused = {}
    for i, spec in enumerate(specs):
        if left() < 30:
            log(f"tuning_{i} ({spec or 'default'}): not run, out of --budget_s")
            continue
        fused[spec] = _child(f"tuning_{i}", spec, out_dir, min(F.timeout_s, left()), log)
    lines = _table(base, fused)
    lines.append(f"{time.perf_counter() - t0:.0f} s; logs under {out_dir}")
    for line in lines:
        log(line)
    with open(os.path.join(out_dir, "in_sm_overlap.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    app.run(main)

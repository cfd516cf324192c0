"""Decode attention and the layer GEMMs against their CTA count: the curves an SM split reads. (GPU)

    PYTHONPATH=. python3 profiling/cta_curves.py                   # both parts, < 7 min
    PYTHONPATH=. python3 profiling/cta_curves.py --part=attention  # (a) alone
    PYTHONPATH=. python3 profiling/cta_curves.py --part=gemm       # (b) alone
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 profiling/cta_curves.py --smoke  # tiny, CPU, ~4 min

(a) The paged decode attention of `--decodes` sequences of `--context` tokens (LLaMA-3-8B heads:
    32 q, 8 KV, D = 128; 16-token pages scattered at random) in TB/s of K and V read, on each of
    `--ctas` CTAs, for each `--variants` tuning of `decode_attention_mgpu` (the "rows" consumer
    and the "swap_ab" one); the Triton kernel on all SMs is the reference line.
(b) Each LLaMA-3-8B layer GEMM (qkv 4096->6144, o 4096->4096, gate/up 4096->28672, down
    14336->4096) over `--tokens` rows (nano-batch sizes) in TFLOP/s on the persistent Mosaic GPU
    GEMM (`persistent_matmul`) on each of `--gemm_ctas` CTAs (default: the SMs left by each
    attention CTA count from a sixth to a half of the SMs, 66-106 of 132, and all of them);
    XLA's dot on all SMs is the reference line.

Each part first builds every point and checks it against its reference (the jnp attention,
XLA's dot): a wrong one shows as "X" and is not timed. Then it times the right ones inside one
jax.profiler trace: `--calls` calls enqueued back to back and blocked once, `--repeats` times,
after a warm-up call (`benchmarks.timing.device_ms_per_call`), inside a profiler annotation
per point. A point's device time per call is the summed duration of the GPU kernels inside its
annotation over its calls, read from the trace when it holds one launch of the point's main
kernel (the one with most of the time) per call; otherwise (`--notrace`, a CPU run) the
back-to-back time per call, marked "*". Points are built in order of importance (reference
lines and all SMs, then CTA counts by their distance from a quarter of the SMs), and a part
builds no more once its share of `--budget_s` is spent, so the run stays short; such a point
shows as "-". Full logs (JSON lines, the table) go to $OUT (default profiling_out/).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from pallas_kernels import _compat
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu
from pallas_kernels.persistent_matmul import MatmulTiling, persistent_matmul

flags.DEFINE_enum("part", "all", ["all", "attention", "gemm"], "(a) attention, (b) gemm, or both")
flags.DEFINE_list("ctas", ["8", "16", "26", "33", "44", "66", "132"], "attention CTA counts")
flags.DEFINE_list("decodes", ["300", "150"], "attention: sequences per call")
flags.DEFINE_integer("context", 1300, "attention: tokens of context per sequence")
flags.DEFINE_integer("page_size", 16, "attention: tokens per KV page")
flags.DEFINE_string("variants",
                    "consumer=rows,consumers=2,stages=4;"
                    "consumer=swap_ab,consumers=2,stages=6;"
                    "consumer=swap_ab,consumers=3,stages=6",
                    "';'-separated key=value lists of decode_attention_mgpu's keyword arguments")
flags.DEFINE_list("gemm_ctas", [], "GEMM CTA counts (default: SMs - c for each attention "
                  "count c from a sixth to a half of the SMs, and all SMs)")
flags.DEFINE_list("tokens", ["256", "512", "1024"], "GEMM rows (nano-batch sizes)")
flags.DEFINE_list("gemms", ["qkv", "o", "gate_up", "down"], "which layer GEMMs")
flags.DEFINE_integer("calls", 10, "calls per timing, enqueued back to back")
flags.DEFINE_integer("repeats", 3, "timings per point; the median is kept")
flags.DEFINE_float("budget_s", 330.0, "seconds for the points; each part gets an equal "
                   "share of what is left when it starts, and starts no point after it")
flags.DEFINE_bool("trace", True, "device time from a jax.profiler trace (else back to back)")
flags.DEFINE_bool("keep_trace", False, "keep the traces under $OUT (else removed once read)")
flags.DEFINE_bool("smoke", False, "tiny shapes in interpret mode on the CPU (checks the script)")
F = flags.FLAGS

# LLaMA-3-8B: (K, N) of each layer GEMM, and the attention heads.
GEMM_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
               "down": (14336, 4096)}
HEADS = {"hq": 32, "hkv": 8, "d": 128}
TOLERANCE = 2e-2  # relative L2 error of a bf16 kernel against its reference
TIME_PER_POINT_S = 0.3  # timing one checked point: 31 calls of at most ~5 ms, and the trace
_TAG = "cta_curves:"


@dataclasses.dataclass
class Point:
    """One cell of a table: `fn(*args)` on `ctas` CTAs ("all" for a reference line); `work` is
    the bytes or FLOPs of one call."""
    part: str
    row: str
    ctas: str
    fn: Callable
    args: tuple
    want: Callable | None  # () -> the reference output
    work: float
    priority: int
    ms: float | None = None
    wall_ms: float | None = None
    kernel: str = ""
    err: float | None = None
    note: str = ""
    from_trace: bool = False

    @property
    def tag(self) -> str:
        return f"{_TAG}{self.part}|{self.row}|{self.ctas}"

    @property
    def rate(self) -> float | None:  # TB/s or TFLOP/s: work / ms / 1e9
        return None if self.ms is None else self.work / self.ms / 1e9


def _priority(ctas: int, num_sms: int) -> int:
    """Order of the points: near a quarter of the SMs (where overlap wants the attention)
    first, then the full grid, then the rest by distance."""
    return 0 if ctas == num_sms else abs(ctas - num_sms // 4) + 1


def _parse_variant(spec: str) -> dict:
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        kwargs[key] = value if key == "consumer" else int(value)
    return kwargs


def _variant_name(kwargs: dict) -> str:
    short = {"consumers": "c", "stages": "s", "pages_per_block": "ppb"}
    rest = " ".join(f"{short.get(k, k)}{v}" for k, v in kwargs.items() if k != "consumer")
    return f"{kwargs.get('consumer', 'rows')} {rest}".strip()


def attention_points(num_sms: int, smoke: bool) -> list[Point]:
    hq, hkv, d = (8, 2, 64) if smoke else (HEADS["hq"], HEADS["hkv"], HEADS["d"])
    page, ctx = F.page_size, (100 if smoke else F.context)
    batches = [3] if smoke else [int(b) for b in F.decodes]
    pages_per = -(-ctx // page)
    num_pages = max(batches) * pages_per
    keys = jax.random.split(jax.random.key(0), 3)
    k_pages = jax.random.normal(keys[0], (hkv, num_pages, page, d), jnp.bfloat16)
    v_pages = jax.random.normal(keys[1], (hkv, num_pages, page, d), jnp.bfloat16)
    perm = np.random.default_rng(0).permutation(num_pages).reshape(max(batches), pages_per)
    scale = d ** -0.5
    points = []
    for b in batches:
        q = jax.random.normal(keys[2], (b, hq, d), jnp.bfloat16)
        args = (q, k_pages, v_pages, jnp.asarray(perm[:b], jnp.int32),
                jnp.full((b,), ctx, jnp.int32))
        kv_bytes = 2 * b * ctx * hkv * d * 2
        ref = jax.jit(functools.partial(decode_attention_reference, sm_scale=scale))
        want = functools.cache(functools.partial(ref, *args))
        shape = f"{b}x{ctx}"
        if not smoke:  # the Triton kernel, all SMs: the reference line
            points.append(Point("attention", f"Triton kernel (reference), {shape}", "all",
                                jax.jit(functools.partial(decode_attention, sm_scale=scale)),
                                args, want, kv_bytes, 0))
        for spec in F.variants.split(";"):
            kwargs = _parse_variant(spec)
            for c in ([2] if smoke else [int(x) for x in F.ctas]):
                fn = jax.jit(functools.partial(decode_attention_mgpu, sm_scale=scale,
                                               num_programs=c, interpret=smoke, **kwargs))
                points.append(Point("attention", f"{_variant_name(kwargs)}, {shape}", str(c),
                                    fn, args, want, kv_bytes, _priority(c, num_sms)))
    return points


def gemm_points(num_sms: int, smoke: bool) -> list[Point]:
    if F.gemm_ctas:
        ctas = sorted({int(c) for c in F.gemm_ctas})
    else:
        ctas = sorted({num_sms - int(c) for c in F.ctas
                       if num_sms // 6 <= int(c) <= num_sms // 2} | {num_sms})
    keys = jax.random.split(jax.random.key(1), 2)
    points = []
    for name in F.gemms:
        k, n = (256, 512) if smoke else GEMM_SHAPES[name]
        w = jax.random.normal(keys[0], (k, n), jnp.bfloat16) * k ** -0.5
        for m in ([64] if smoke else [int(t) for t in F.tokens]):
            x = jax.random.normal(keys[1], (m, k), jnp.bfloat16)
            xla = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
                          .astype(a.dtype))
            want = functools.cache(functools.partial(xla, x, w))
            # the persistent GEMM runs min(CTAs, output tiles) CTAs: the row says how many
            cta_m, cta_n = MatmulTiling().cta_tile
            tiles = -(-m // cta_m) * (n // cta_n)
            row, flops = f"{name} {k}->{n}, {m} tokens, {tiles} tiles", 2.0 * m * k * n
            if not smoke:  # XLA's dot, all SMs: the reference line
                points.append(Point("gemm", row, "XLA", xla, (x, w), want, flops, 0))
            for c in ([2] if smoke else ctas):
                fn = jax.jit(functools.partial(persistent_matmul, num_programs=c,
                                               interpret=smoke))
                # the GEMM gets what the attention leaves: order by the attention's count
                points.append(Point("gemm", row, str(c), fn, (x, w), want, flops,
                                    _priority(num_sms - c, num_sms) if c < num_sms else 0))
    return points


def _rel_err(got, want) -> float:
    got, want = (jnp.asarray(a, jnp.float32).ravel() for a in (got, want))
    return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def check_points(points: list[Point], deadline: float, log) -> list[Point]:
    """Builds and checks each point against its reference in priority order until `deadline`
    (perf_counter); returns the right ones, in that order."""
    right = []
    for p in sorted(points, key=lambda p: p.priority):  # stable: the listed order within one
        if time.perf_counter() > deadline:
            p.note = "out of budget"
            continue
        try:
            p.err = _rel_err(p.fn(*p.args), p.want())
            if p.err < TOLERANCE:
                right.append(p)
            else:
                p.note = "WRONG"
        except Exception as e:  # noqa: BLE001 - a point that fails to build or run is a finding
            p.note = f"failed: {type(e).__name__}"
            log(f"{p.tag} failed: {type(e).__name__}: {str(e)[:600]}")
            log(traceback.format_exc()[-1500:])
        log(json.dumps({"part": p.part, "row": p.row, "ctas": p.ctas, "rel_err": p.err,
                        "note": p.note}))
    return right


def time_points(points: list[Point], log) -> None:
    """Back-to-back device time per call of each (built, checked) point, inside a profiler
    annotation named by its tag."""
    for p in points:
        with jax.profiler.TraceAnnotation(p.tag):
            p.wall_ms = device_ms_per_call(p.fn, *p.args, calls=F.calls, repeats=F.repeats)
        p.ms = p.wall_ms
        log(json.dumps({"part": p.part, "row": p.row, "ctas": p.ctas, "wall_ms": p.wall_ms}))


def window_kernels(data, tags) -> dict[str, tuple[str, float, float, int]]:
    """{tag: (main kernel, its median ms, ms of all kernels, main kernel launches)} from a
    jax.profiler ProfileData: the GPU kernels whose midpoint falls inside the host annotation
    `tag`. The main kernel is the name with most of the window's time."""
    from profiling.trace_summary import kernel_events

    windows = {}
    for plane in data.planes:
        if plane.name.startswith("/host:"):
            for line in plane.lines:
                for e in line.events:
                    if e.name in tags:
                        windows[e.name] = (e.start_ns, e.start_ns + e.duration_ns)
    try:
        events = kernel_events(data)
    except ValueError:  # no GPU plane (a CPU run)
        return {}
    out = {}
    for tag, (start, end) in windows.items():
        by_name: dict[str, list[float]] = {}
        for name, s, e in events:
            if start <= (s + e) / 2 <= end:
                by_name.setdefault(name, []).append(e - s)
        if by_name:
            main = max(by_name, key=lambda n: sum(by_name[n]))
            total = sum(sum(d) for d in by_name.values())
            out[tag] = (main, statistics.median(by_name[main]) / 1e6, total / 1e6,
                        len(by_name[main]))
    return out


def apply_trace(points: list[Point], trace_dir: str, log) -> None:
    """Device time per call from the trace: all kernels of a point's window over its calls
    (the warm-up call and `--calls` x `--repeats`), where the window holds every call's main
    kernel; otherwise the back-to-back time stays."""
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        log(f"no trace under {trace_dir}: back-to-back times")
        return
    found = window_kernels(ProfileData.from_file(max(paths, key=os.path.getmtime)),
                           {p.tag for p in points if p.wall_ms is not None})
    calls = 1 + F.calls * F.repeats
    used = 0
    for p in points:
        if p.tag not in found:
            continue
        p.kernel, main_ms, total_ms, launches = found[p.tag]
        if launches == calls:
            p.ms, p.from_trace = total_ms / calls, True
            used += 1
        log(json.dumps({"part": p.part, "row": p.row, "ctas": p.ctas, "kernel": p.kernel,
                        "kernel_median_ms": main_ms, "trace_ms_per_call": total_ms / calls,
                        "wall_ms": p.wall_ms, "launches": launches}))
    log(f"trace: device time of {used} of {sum(p.wall_ms is not None for p in points)} "
        f"timed points from the trace, the rest back to back")


def table(points: list[Point], unit: str, title: str) -> list[str]:
    """Rows x CTA counts of rates, reference columns last; '-' not timed, 'X' wrong against
    the reference, '!' failed."""
    counts = sorted({int(p.ctas) for p in points if p.ctas.isdigit()})
    cols = [str(c) for c in counts] + sorted({p.ctas for p in points if not p.ctas.isdigit()})
    rows = list(dict.fromkeys(p.row for p in points))
    cell = {(p.row, p.ctas): p for p in points}

    def text(p: Point | None) -> str:
        if p is None:
            return ""
        if p.rate is not None:
            return f"{p.rate:.2f}" + ("" if p.from_trace or not F.trace else "*")
        return "X" if p.note == "WRONG" else "!" if p.note.startswith("failed") else "-"

    width = max(len(r) for r in rows + [unit])
    lines = [title, f"{unit:<{width}} " + " ".join(f"{c:>7}" for c in cols)]
    for row in rows:
        lines.append(f"{row:<{width}} " + " ".join(f"{text(cell.get((row, c))):>7}"
                                                   for c in cols))
    return lines


def main(argv):
    del argv
    t0 = time.perf_counter()
    out_dir = os.environ.get("OUT", "profiling_out")
    os.makedirs(out_dir, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    if F.smoke:  # the interpreter runs a call in ~30 s: one call per point, two consumers
        F.calls, F.repeats = 1, 1
        F.variants = "consumer=rows,consumers=2,stages=2;consumer=swap_ab,consumers=2,stages=2"
        F.gemms, F.budget_s = ["qkv"], 1e9
    num_sms = _compat.num_sms()
    log(f"{jax.devices()[0].device_kind}, {num_sms} SMs, JAX {jax.__version__}")
    parts = ["attention", "gemm"] if F.part == "all" else [F.part]
    results = {}
    for done, part in enumerate(parts):
        now = time.perf_counter()
        deadline = now + (t0 + F.budget_s - now) / (len(parts) - done)
        points = (attention_points if part == "attention" else gemm_points)(num_sms, F.smoke)
        # Build and check first (compiles stay out of the trace), leaving time to time them.
        right = check_points(points, deadline - TIME_PER_POINT_S * len(points), log)
        if F.trace:
            trace_dir = tempfile.mkdtemp(prefix=f"cta_curves_{part}_", dir=out_dir)
            with jax.profiler.trace(trace_dir):
                time_points(right, log)
            apply_trace(right, trace_dir, log)
            if not F.keep_trace:
                shutil.rmtree(trace_dir, ignore_errors=True)
        else:
            time_points(right, log)
        results[part] = points

    lines = [""]
    if "attention" in results:
        lines += table(results["attention"], "TB/s",
                       "(a) decode attention: TB/s of K and V read, against CTAs; Triton "
                       "kernel on all SMs")
    if "gemm" in results:
        lines += [""] + table(results["gemm"], "TFLOP/s",
                              "(b) layer GEMMs: TFLOP/s of the persistent Mosaic GPU GEMM "
                              "against CTAs; XLA's dot on all SMs")
    lines.append(f"X: wrong against the reference (not timed); !: failed; -: out of budget; "
                 f"*: back-to-back time, not from the trace. {time.perf_counter() - t0:.0f} s.")
    for line in lines:
        log(line)
    with open(os.path.join(out_dir, "cta_curves.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    app.run(main)

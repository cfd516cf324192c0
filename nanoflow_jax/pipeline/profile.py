"""Per-op device times, the auto-search's input: the format, the profiler, a synthetic profile.

A profile holds, for one device, JAX version, model shapes, dtype and dense batch, the time of
each of the executor's ops run alone (`executor._State.run`, the very code a schedule runs):

    gemm[op][i][k]            ms of qkv | o_proj | up_gate | down over tokens[i] rows at
                              shares[k] of the SMs (norm, RoPE, SwiGLU and the residual add
                              are part of these ops, as in the executor)
    decode_attn[i][c][k]      ms of decode attention of tokens[i] decode rows, each with
                              contexts[c] tokens of context, at shares[k] (read-only: the KV
                              write is its own entry)
    prefill_attn[i]           ms of prefill attention of one prompt chunk of tokens[i] tokens
                              (no prior context), on all SMs (the kernel has no SM knob)
    kv_write[i]               ms of writing tokens[i] rows' K and V into the paged cache
    all_reduce[i]             tensor parallelism only (None at tensor_parallel_size 1): ms of
                              one all-reduce of tokens[i] rows of the residual stream [·, D]
                              over the mesh, the schedule's collective op
    corun                     optional: ms of GEMM ops beside decode attention, run as the
                              executor overlaps them, and the overlap efficiency read from
                              them (`corun.py`); None: ops beside each other keep their solo
                              speed at their share (the solver's assumption)
    layer                     optional: the calibration, {"ms": [tokens], "num_decode":
                              [tokens], "context": c}: ms of one whole sequential decoder
                              layer over tokens[i] rows, num_decode[i] of them decodes of c
                              tokens of context and the rest one prompt chunk (the workload's
                              mix); None: no calibration

The calibration exists because a GEMM timed alone is slower than the same GEMM inside a layer:
on an H200 at 1024 tokens the four GEMM ops alone sum to 0.72 ms, inside the sequential layer
(whose attention parts the profile gets right) they take ~0.56 ms: XLA's isolated programs pick
other GEMM kernels and pay each small kernel's launch. `gemm_ms` at share 1 (XLA's GEMM)
therefore scales the solo time by the layer's GEMM share over the solo GEMM sum at that token
count, `gemm_scale`, so that the sequential layer predicts what it measures at every profiled
token count and nano-batches of n rows predict what a layer of n rows measures. The persistent
GEMM at shares below 1 is the same kernel alone or in a layer and keeps its solo time, and the
co-run table compares solo times with solo times (`gemm_ms(..., calibrated=False)`).

Under tensor parallelism (`key["tensor_parallel_size"]` > 1) the GEMMs and attention are timed
at one shard's shapes (`parallel.local_config`: its heads and FFN columns) on one device,
the all-reduce over the first tensor_parallel_size devices.

A share below 1 runs the kernel the executor runs at that share: the persistent Mosaic GPU GEMM
on round(share·SMs) CTAs (`executor.persistent_gemm`), and decode attention persistent on as
many programs; share 1 is the default path (XLA's GEMM, the non-persistent attention). On the
CPU every share runs the same jnp code: the profile is correct there, only meaningless.

Lookups interpolate linearly between profiled token counts: a GEMM below the smallest count
costs what the smallest does (its weights are read all the same), attention and the KV write
scale down to 0 rows; decode attention is linear in the context between and beyond the
profiled contexts; an all-reduce below the smallest count costs what the smallest does (its
latency).

`scripts/autosearch.py --steps=profile` profiles on the local device and writes the JSON to the
cache (`cache_path`), where `schedule="auto"` finds it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np

from nanoflow_jax.pipeline import corun

GEMM_OPS = ("qkv", "o_proj", "up_gate", "down")
FORMAT = 1
DEFAULT_SHARES = (0.25, 0.5, 0.75, 1.0)
DEFAULT_CONTEXTS = (512, 2048)


def model_key(config) -> dict:
    """The model shapes a profile depends on."""
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "attention_bias": config.attention_bias}


def device_key() -> dict:
    import jax

    dev = jax.devices()[0]
    from pallas_kernels._compat import num_sms

    return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "num_sms": num_sms()}


def profile_key(config, num_tokens: int, dtype: str, page_size: int,
                tensor_parallel_size: int = 1) -> dict:
    """What a profile is valid for: device, JAX version, model shapes, dtype, dense batch (and
    the tensor-parallel size, when above 1)."""
    key = {**device_key(), "model": model_key(config), "dtype": str(dtype),
           "num_tokens": num_tokens, "page_size": page_size}
    if tensor_parallel_size > 1:
        key["tensor_parallel_size"] = tensor_parallel_size
    return key


def cache_dir() -> str:
    """$NANOFLOW_JAX_CACHE, else ~/.cache/nanoflow_jax."""
    return os.environ.get("NANOFLOW_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "nanoflow_jax")


def cache_path(key: dict, directory: str | None = None) -> str:
    """The profile's file in the cache: one per device, JAX version, model, dtype, batch."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key['device']}-{key['dtype']}-T{key['num_tokens']}-{digest}.json"
    return os.path.join(directory or cache_dir(), "profiles", name.replace(" ", "_"))


@dataclasses.dataclass(frozen=True)
class Profile:
    key: dict
    tokens: tuple[int, ...]  # profiled token (and decode row) counts, increasing
    shares: tuple[float, ...]  # profiled SM shares, increasing, the last 1.0
    contexts: tuple[int, ...]  # profiled decode contexts, increasing
    gemm: dict  # op -> [tokens][shares] ms
    decode_attn: list  # [tokens][contexts][shares] ms
    prefill_attn: list  # [tokens] ms
    kv_write: list  # [tokens] ms
    all_reduce: list | None = None  # [tokens] ms; None: one device (nothing to reduce)
    corun: dict | None = None  # the co-run table (corun.py); None: none measured
    layer: dict | None = None  # the calibration (module doc); None: none measured

    def __post_init__(self):
        t, s, c = len(self.tokens), len(self.shares), len(self.contexts)
        if list(self.tokens) != sorted(set(self.tokens)) or not t:
            raise ValueError(f"profile tokens must increase, got {self.tokens}")
        if list(self.shares) != sorted(set(self.shares)) or self.shares[-1] != 1.0:
            raise ValueError(f"profile shares must increase to 1.0, got {self.shares}")
        shape_ok = (set(self.gemm) == set(GEMM_OPS)
                    and all(np.shape(self.gemm[o]) == (t, s) for o in GEMM_OPS)
                    and np.shape(self.decode_attn) == (t, c, s)
                    and np.shape(self.prefill_attn) == (t,) and np.shape(self.kv_write) == (t,)
                    and (self.all_reduce is None or np.shape(self.all_reduce) == (t,)))
        if not shape_ok:
            raise ValueError("profile tables do not match its tokens, contexts and shares")
        if self.corun is not None:
            corun.check(self.corun, GEMM_OPS, self.shares)
        if self.layer is not None and not (
                set(self.layer) == {"ms", "num_decode", "context"}
                and np.shape(self.layer["ms"]) == np.shape(self.layer["num_decode"]) == (t,)
                and all(0 <= d <= n for d, n in zip(self.layer["num_decode"], self.tokens))):
            raise ValueError("profile layer calibration must hold ms and num_decode (at most "
                             "the rows) per token count, and a context")
        if (self.all_reduce is None) != (self.tensor_parallel_size == 1):
            raise ValueError(f"a profile has all-reduce times exactly when its "
                             f"tensor_parallel_size ({self.tensor_parallel_size}) is above 1")

    @property
    def tensor_parallel_size(self) -> int:
        return self.key.get("tensor_parallel_size", 1)

    # ---- lookups (ms) -----------------------------------------------------------------------

    def _share(self, share: float) -> int:
        if share not in self.shares:
            raise ValueError(f"share {share} not profiled; shares: {self.shares}")
        return self.shares.index(share)

    def gemm_ms(self, op: str, tokens: int, share: float = 1.0, calibrated: bool = True
                ) -> float:
        """`op` over `tokens` rows at `share`; at share 1 scaled by `gemm_scale` unless
        `calibrated` is off (module doc)."""
        k = self._share(share)
        ms = _interp(self.tokens, [row[k] for row in self.gemm[op]], tokens, floor=True)
        return ms * self.gemm_scale(tokens) if calibrated and share == 1.0 else ms

    def gemm_scale(self, tokens: int) -> float:
        """In-layer over solo time of the share-1 GEMM ops at `tokens` rows (1.0 without a
        calibration): at each profiled count (layer - its attention parts) / the solo GEMM
        sum, clipped to [0.2, 5] against a noisy point, linear between counts and constant
        beyond them."""
        if self.layer is None:
            return 1.0
        scales = []
        for i, n in enumerate(self.tokens):
            nd = self.layer["num_decode"][i]
            attn = (self.decode_ms(nd, self.layer["context"]) + self.kv_write_ms(n)
                    + (self.prefill_ms(n - nd) if n > nd else 0.0))
            solo = sum(self.gemm_ms(op, n, calibrated=False) for op in GEMM_OPS)
            scales.append(float(np.clip((self.layer["ms"][i] - attn) / solo, 0.2, 5.0)))
        return float(np.interp(tokens, self.tokens, scales))

    def decode_ms(self, rows: int, context: int, share: float = 1.0) -> float:
        if rows <= 0:
            return 0.0
        k = self._share(share)
        per_context = [_interp(self.tokens, [r[c][k] for r in self.decode_attn], rows)
                       for c in range(len(self.contexts))]
        return max(_interp(self.contexts, per_context, context, extrapolate=True), 1e-6)

    def prefill_ms(self, tokens: int) -> float:
        return _interp(self.tokens, self.prefill_attn, tokens)

    def kv_write_ms(self, tokens: int) -> float:
        return _interp(self.tokens, self.kv_write, tokens)

    def all_reduce_ms(self, tokens: int) -> float:
        if self.all_reduce is None:
            raise ValueError("this profile is of one device: it has no all-reduce times")
        return _interp(self.tokens, self.all_reduce, tokens, floor=True)

    def overlap_efficiency(self, op: str, gemm_rows: int, attn_rows: int,
                           gemm_share: float = 1.0) -> float:
        """GEMM `op` beside attention: 1 the pair takes the longer one's time, 0 the sum of
        both (`corun.efficiency`); 1 without a co-run table."""
        return corun.efficiency(self, op, gemm_rows, attn_rows, gemm_share)

    # ---- JSON --------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a profile of format {FORMAT}")
        return cls(d["key"], tuple(d["tokens"]), tuple(d["shares"]), tuple(d["contexts"]),
                   d["gemm"], d["decode_attn"], d["prefill_attn"], d["kv_write"],
                   d.get("all_reduce"), d.get("corun"), d.get("layer"))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Profile":
        with open(path) as f:
            return cls.from_json(f.read())


def _interp(xs, ys, x: float, floor: bool = False, extrapolate: bool = False) -> float:
    """Linear in x between the points; below the first: ys[0] (floor) or scaled toward 0;
    beyond the last: the last segment's slope (extrapolate) or scaled proportionally."""
    xs, ys = list(xs), list(ys)
    if len(xs) == 1:
        return ys[0] if floor or extrapolate else ys[0] * x / xs[0]
    if x < xs[0] and not extrapolate:
        return ys[0] if floor else ys[0] * x / xs[0]
    if x > xs[-1] and not extrapolate:
        return ys[-1] * x / xs[-1]
    i = min(max(int(np.searchsorted(xs, x)) - 1, 0), len(xs) - 2)
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + w * (ys[i + 1] - ys[i]))


def token_counts(num_tokens: int, step: int) -> tuple[int, ...]:
    """Multiples of `step` up to the dense batch (the dense batch itself included)."""
    if step < 1:
        raise ValueError(f"token step must be >= 1, got {step}")
    return tuple(sorted(set(range(step, num_tokens, step)) | {num_tokens}))


# ---- the synthetic profile (tests, and a prior where nothing was measured) ------------------


def _shard_config(config, tensor_parallel_size: int):
    """The config of one tensor-parallel shard's ops, summing nothing (the all-reduce is an op
    of its own); the config itself at size 1."""
    if tensor_parallel_size == 1:
        return config
    from nanoflow_jax.parallel import local_config

    return dataclasses.replace(local_config(config, tensor_parallel_size), tp_axis=None)


def attention_speed(share: float) -> float:
    """NanoFlow's measured fraction of decode attention's speed kept at an SM share."""
    return float(np.interp(share, [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
                           [0.0, 0.25, 0.5, 0.7, 0.85, 0.95, 1.0]))


def synthetic_profile(config, num_tokens: int, dtype: str = "bfloat16", token_step: int = 128,
                      shares=DEFAULT_SHARES, contexts=DEFAULT_CONTEXTS, peak_tflops=700.0,
                      hbm_tbps=4.0, page_size: int = 16, tensor_parallel_size: int = 1,
                      link_gbps: float = 300.0, collective_latency_ms: float = 0.02,
                      overlap_efficiency: float | None = None) -> Profile:
    """A roofline profile: GEMMs at `peak_tflops` scaled by their share of the SMs (or bound
    by reading their weights), decode attention bound by reading the KV cache at `hbm_tbps`
    times `attention_speed(share)`, prefill attention at the peak. Under tensor parallelism
    the ops have one shard's shapes and a ring all-reduce moves 2·(N-1)/N of its rows' bytes
    at `link_gbps` after `collective_latency_ms`. With `overlap_efficiency` a co-run table
    over every token count at the last context gives every pair that efficiency. No device is
    touched."""
    item = np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize
    tp, full_config = tensor_parallel_size, config
    config = _shard_config(config, tp)
    tokens = token_counts(num_tokens, token_step)
    d, f, qkv = config.hidden_size, config.intermediate_size, config.q_size + 2 * config.kv_size
    dims = {"qkv": (d, qkv), "o_proj": (config.q_size, d), "up_gate": (d, 2 * f),
            "down": (f, d)}
    peak, hbm, launch = peak_tflops * 1e9, hbm_tbps * 1e9, 0.004  # per ms; ms

    def gemm(op, n, share):
        k, m = dims[op]
        return launch + max(2 * n * k * m / (peak * share), (k * m + n * (k + m)) * item / hbm)

    kv_bytes = 2 * config.kv_size * item  # K and V of one token
    table = {op: [[gemm(op, n, s) for s in shares] for n in tokens] for op in GEMM_OPS}
    decode = [[[launch + n * c * kv_bytes / (hbm * attention_speed(s)) for s in shares]
               for c in contexts] for n in tokens]
    prefill = [launch + 2 * n * n * config.q_size / peak for n in tokens]  # causal QK^T + PV
    kv_write = [launch + 2 * n * kv_bytes / hbm for n in tokens]
    all_reduce = None if tp == 1 else [
        collective_latency_ms + 2 * (tp - 1) / tp * n * config.hidden_size * item
        / (link_gbps * 1e6) for n in tokens]
    key = {"device": "synthetic", "platform": "none", "jax": "-", "num_sms": 132,
           "model": model_key(full_config), "dtype": str(dtype), "num_tokens": num_tokens,
           "page_size": page_size}
    if tp > 1:
        key["tensor_parallel_size"] = tp
    prof = Profile(key, tokens, tuple(shares), tuple(contexts), table, decode, prefill,
                   kv_write, all_reduce)
    if overlap_efficiency is None:
        return prof
    pairs = corun.synthetic_table(prof, tokens, contexts[-1], corun_shares(shares),
                                  overlap_efficiency)
    return dataclasses.replace(prof, corun=pairs)


def corun_shares(shares) -> tuple[float, ...]:
    """The GEMM shares whose co-run pairs fit the profiled shares (module doc of corun.py)."""
    return tuple(p for p in shares if corun.attention_share(p) in shares)


# ---- the profiler -----------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            filled = 30 * self.done // max(self.total, 1)
            spent = time.perf_counter() - self.t0
            left = spent / self.done * (self.total - self.done)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
                             f" {spent:5.0f}s, ~{left:4.0f}s left: {what:<36}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class Points:
    """Measured points by name, kept in a JSON file (`path`; None: in memory only) after each
    one, so that a profile cut short (a command's time limit) resumes where it stopped. The
    file holds the profile's key and the measuring knobs; points saved under another key or
    other knobs are not reused."""

    def __init__(self, path: str | None, key: dict):
        self.path, self.key, self.ms = path, key, {}
        if path and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("key") == key:
                self.ms = dict(saved["ms"])

    @property
    def resumed(self) -> int:
        return len(self.ms)

    def get(self, name: str, measure) -> float:
        """The point's ms: saved, or `measure()` now (then saved)."""
        if name not in self.ms:
            self.ms[name] = float(measure())
            if self.path:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                tmp = f"{self.path}.tmp"
                with open(tmp, "w") as f:
                    json.dump({"key": self.key, "ms": self.ms}, f)
                os.replace(tmp, self.path)
        return self.ms[name]

    def finish(self) -> None:
        """The profile is whole: the file has served its purpose."""
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


def _device_ms_per_call():
    from nanoflow_jax.benchmarks.timing import device_ms_per_call

    return device_ms_per_call


def run_op(op, layer_weights, inputs: dict, cache, pos, meta, config, attention,
           prewritten=frozenset(), gemm_on=None) -> list:
    """`op` (a NanoOp over rows [0, n)) alone, as the executor runs it: `inputs` {tensor name:
    [n, ·]}, `cache` one layer's KV cache (attention), `pos` [n] positions (qkv), `meta` the
    rows' attention metadata -> the tensors it writes."""
    from nanoflow_jax.pipeline import executor

    n = op.end
    pieces = {executor._key(name, 0): executor._Pieces([(0, n, a)])
              for name, a in inputs.items()}
    state = executor._State(pieces, {0: cache}, {"layer": {0: layer_weights},
                                                 "pos": {(0, n): pos}, "meta": {(0, n): meta}},
                            prewritten, gemm_on)
    state.run(op, 0, config, attention)
    return [state.pieces[executor._key(w, 0)].read(0, n) for w in executor.WRITES[op.op]]


def profile_ops(config, num_tokens: int, dtype: str = "bfloat16", token_step: int = 128,
                shares=DEFAULT_SHARES, contexts=DEFAULT_CONTEXTS, page_size: int = 16,
                attention_impl: str = "auto", calls: int = 5, repeats: int = 5,
                layers: int | None = None, kv_pool_bytes: int | None = None,
                progress: bool = True, tensor_parallel_size: int = 1,
                corun_tokens=(), corun_context: int | None = None,
                resume_path: str | None = None, workload=None,
                calibrate: bool = True) -> Profile:
    """Times every op alone on the local device over token counts, contexts and SM shares;
    with `tensor_parallel_size` > 1 at one shard's shapes, plus the all-reduce of the residual
    stream's rows over that many devices (`all_reduce_ms`).

    An op runs as the layers of a step run it: `layers` instances (None: 4 on a GPU, 2
    elsewhere) back to back in ONE program, each on its own weights (or its own queries: no
    instance is a copy of another, nor finds its weights in the L2), and the time is the
    program's device time (`benchmarks.timing.device_ms_per_call`) over `layers`. One program
    per op would be timed by the host instead: a jitted call costs the host tens of
    microseconds, as long as a small op runs on the device.

    Decode rows read distinct pages from a pool of `kv_pool_bytes` (None: 4 GiB on a GPU,
    64 MiB elsewhere), reused round robin when rows x context exceed it: far larger than the
    L2, so reuse does not flatter the time.

    With `corun_tokens` it also times the co-run table (`corun.py`): every GEMM op over each
    of those row counts beside decode attention over each of them at `corun_context` (None:
    the last context), at each share whose complement is profiled, issued on two streams in
    one scheduling group on a GPU (elsewhere one after the other: meaningless, like the
    shares).

    `calibrate` also times a whole sequential decoder layer at each token count with
    `workload`'s mix scaled to it (`autosearch.Workload`; None: its default at num_tokens),
    `layers` layers in one program by `guard.layer_timer`: the profile's `layer`
    calibration (module doc). Not under tensor parallelism (the layer would need the mesh).

    `resume_path`: a file of the points measured so far (`Points`); a run cut short resumes
    there, and the file is removed once the profile is whole."""
    import jax
    import jax.numpy as jnp

    from nanoflow_jax.batch import BatchShape, SeqChunk, build_batch
    from nanoflow_jax.kv_cache import init_kv_cache, page_bytes, write_kv
    from nanoflow_jax.models.paged_attention import attention_fn
    from nanoflow_jax.pipeline import executor
    from nanoflow_jax.pipeline.schedule import NanoOp
    from nanoflow_jax.weights import random_params

    shares, contexts = tuple(shares), tuple(contexts)
    tokens = token_counts(num_tokens, token_step)
    tp, full_config = tensor_parallel_size, config
    config = _shard_config(config, tp)
    time_call = _device_ms_per_call()
    on_gpu = jax.default_backend() == "gpu"
    gemm_on = executor.persistent_gemm if on_gpu else None
    attention = attention_fn(attention_impl)
    reps = layers or (4 if on_gpu else 2)
    one_layer = dataclasses.replace(config, num_layers=1, vocab_size=16, tie_word_embeddings=True)
    weights = random_params(dataclasses.replace(one_layer, num_layers=reps), dtype)["layers"]
    jdtype = jnp.dtype(dtype)
    corun_tokens, pair_shares = tuple(corun_tokens), corun_shares(shares)
    calibrate = calibrate and tp == 1
    bar = Progress(len(tokens) * (len(GEMM_OPS) * len(shares) + len(contexts) * len(shares) + 2
                                  + (tp > 1) + calibrate)
                   + len(GEMM_OPS) * len(corun_tokens) ** 2 * len(pair_shares), progress)
    rng = np.random.default_rng(0)
    points = Points(resume_path, {
        "profile": profile_key(full_config, num_tokens, dtype, page_size, tp),
        "calls": calls, "repeats": repeats, "layers": reps, "kv_pool_bytes": kv_pool_bytes,
        "attention_impl": attention_impl})
    if points.resumed:
        print(f"profile: resuming with {points.resumed} points from {resume_path}",
              file=sys.stderr)

    def measure(name: str, timer, *args, **kwargs) -> float:
        """A point: `timer(*args, **kwargs)` now, or its value saved earlier (`points`)."""
        ms = points.get(name, lambda: timer(*args, **kwargs))
        bar.step(name)
        return ms

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jdtype)

    def attention_inputs(n):
        """q, k, v of n tokens for each instance (distinct: no instance repeats another)."""
        return [{"q": rand(n, config.num_heads, config.head_dim),
                 "k": rand(n, config.num_kv_heads, config.head_dim),
                 "v": rand(n, config.num_kv_heads, config.head_dim)} for _ in range(reps)]

    def op_call(kind, n, share, prewritten=frozenset()):
        """One program: the op on each (layer weights, inputs) pair of its arguments."""
        op = NanoOp(kind, 0, n, sm_share=share)
        return jax.jit(lambda weight_sets, input_sets, cache, pos, meta: [
            run_op(op, w, x, cache, pos, meta, config, attention, prewritten, gemm_on)
            for w, x in zip(weight_sets, input_sets)])

    def gemm_inputs(n):
        x = rand(n, config.hidden_size)
        return {"qkv": {"x": x}, "up_gate": {"x": x},
                "o_proj": {"attn": rand(n, config.num_heads, config.head_dim), "x": x},
                "down": {"gate_up": rand(n, 2 * config.intermediate_size), "x": x}}

    def decode_batch(n, ctx, num_pages):
        """n decode rows of `ctx` tokens of context over distinct pages (round robin)."""
        pages_per = -(-(ctx + 1) // page_size)
        decodes = [SeqChunk([0], ctx, [(r * pages_per + j) % num_pages
                                       for j in range(pages_per)]) for r in range(n)]
        return build_batch(decodes, [], BatchShape(n, n, 1, pages_per), page_size)

    def decode_pages(ctx, rows):
        pages_per = -(-(ctx + 1) // page_size)
        return max(pages_per, min(rows * pages_per, pool // per_page))

    def time_ops(fn, *args):
        """ms of one instance of the op: the program's device time over its instances."""
        return time_call(fn, *args, calls=calls, repeats=repeats) / reps

    gemm = {op: [[0.0] * len(shares) for _ in tokens] for op in GEMM_OPS}
    for i, n in enumerate(tokens):
        inputs = gemm_inputs(n)
        pos = jnp.arange(n, dtype=jnp.int32)
        for op in GEMM_OPS:
            for k, share in enumerate(shares):
                gemm[op][i][k] = measure(f"{op} {n} tokens, share {share:g}", time_ops,
                                         op_call(op, n, share), weights, [inputs[op]] * reps,
                                         None, pos, None)

    per_page = page_bytes(one_layer, page_size, jdtype)
    pool = kv_pool_bytes or ((4 << 30) if on_gpu else (64 << 20))
    decode = [[[0.0] * len(shares) for _ in contexts] for _ in tokens]
    prefill, kv_write = [0.0] * len(tokens), [0.0] * len(tokens)
    for c, ctx in enumerate(contexts):
        num_pages = decode_pages(ctx, tokens[-1])
        cache = init_kv_cache(one_layer, num_pages, page_size, jdtype)[0]
        for i, n in enumerate(tokens):
            batch = decode_batch(n, ctx, num_pages)
            meta = jax.device_put(batch.attn)
            qkv = attention_inputs(n)
            pos = jnp.asarray(batch.positions)
            for k, share in enumerate(shares):
                fn = op_call("attn", n, share, prewritten=frozenset({(0, 0, n)}))
                decode[i][c][k] = measure(f"decode {n} rows @{ctx}, share {share:g}",
                                          time_ops, fn, weights, qkv, cache, pos, meta)
        del cache
    for i, n in enumerate(tokens):
        pages_per = -(-n // page_size)
        cache = init_kv_cache(one_layer, pages_per, page_size, jdtype)[0]
        batch = build_batch([], [SeqChunk(list(range(n)), 0, list(range(pages_per)))],
                            BatchShape(n, 0, 1, pages_per), page_size)
        meta = jax.device_put(batch.attn)
        qkv = attention_inputs(n)
        fn = op_call("attn", n, 1.0, prewritten=frozenset({(0, 0, n)}))
        prefill[i] = measure(f"prefill {n} tokens", time_ops, fn, weights, qkv, cache,
                             jnp.asarray(batch.positions), meta)

        # The KV write updates the cache in place: `reps` writes of distinct K/V one after
        # the other, the cache donated from call to call; each call returns a scalar of the
        # same execution to block on (the cache itself is donated).
        def write_all(kp, vp, kvs, slots):
            for x in kvs:
                kp, vp = write_kv(kp, vp, x["k"], x["v"], slots)
            return (kp, vp), jnp.zeros((), jnp.int32)

        write = jax.jit(write_all, donate_argnums=(0, 1))
        held, slots = [cache], jnp.asarray(batch.attn.slots)

        def write_once(held=held, write=write, kvs=qkv, slots=slots):
            held[0], done = write(*held[0], kvs, slots)
            return done

        kv_write[i] = measure(f"kv write {n} tokens", time_ops, write_once)
        del cache, held
    layer = None
    if calibrate:
        from nanoflow_jax.pipeline.autosearch import Workload
        from nanoflow_jax.pipeline.guard import layer_timer
        from nanoflow_jax.pipeline.schedule import sequential

        mix = workload or Workload.default(num_tokens)
        layer = {"ms": [], "num_decode": [], "context": mix.decode_context}
        for n in tokens:
            nd = min(n, round(mix.num_decode * n / num_tokens))
            timer = layer_timer(weights, one_layer, Workload(nd, mix.decode_context), n, dtype,
                                page_size, attention_impl, layers=reps, steps=calls,
                                repeats=repeats, kv_pool_bytes=kv_pool_bytes,
                                time_call=time_call)
            layer["num_decode"].append(nd)
            layer["ms"].append(measure(f"layer {n} tokens, {nd} decodes @{mix.decode_context}",
                                       lambda timer=timer, n=n: timer(sequential(n))))
    pairs = None
    if corun_tokens:
        ctx = corun_context or contexts[-1]
        num_pages = decode_pages(ctx, corun_tokens[-1])
        cache = init_kv_cache(one_layer, num_pages, page_size, jdtype)[0]
        ms = {op: [[[0.0] * len(pair_shares) for _ in corun_tokens] for _ in corun_tokens]
              for op in GEMM_OPS}
        for i, n_g in enumerate(corun_tokens):
            inputs, pos = gemm_inputs(n_g), jnp.arange(n_g, dtype=jnp.int32)
            for j, n_a in enumerate(corun_tokens):
                meta = jax.device_put(decode_batch(n_a, ctx, num_pages).attn)
                qkv = attention_inputs(n_a)
                for op in GEMM_OPS:
                    for k, p in enumerate(pair_shares):
                        fn = corun.pair_call(op, n_g, n_a, p, config, attention, gemm_on,
                                             streams=on_gpu)
                        ms[op][i][j][k] = measure(
                            f"{op} {n_g} beside attention {n_a}, share {p:g}", time_ops, fn,
                            weights, [inputs[op]] * reps, qkv, cache, pos, meta)
        del cache
        pairs = {"tokens": list(corun_tokens), "context": ctx, "shares": list(pair_shares),
                 "ms": ms}
    all_reduce = None
    if tp > 1:
        all_reduce = [0.0] * len(tokens)
        for i, n in enumerate(tokens):
            call, x = all_reduce_call(tp, n, config.hidden_size, jdtype)
            all_reduce[i] = measure(f"all-reduce {n} tokens", time_call, call, x,
                                    calls=calls, repeats=repeats)
    points.finish()
    return Profile(profile_key(full_config, num_tokens, dtype, page_size, tp), tokens, shares,
                   contexts, gemm, decode, prefill, kv_write, all_reduce, pairs, layer)


def all_reduce_call(tp: int, rows: int, hidden_size: int, dtype):
    """The schedule's collective op alone: (jitted psum over a mesh of `tp` devices, its input
    [tp·rows, D], each device's [rows, D] block its partial sum)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from nanoflow_jax import parallel

    mesh = parallel.make_mesh(tp)
    spec = P(parallel.TP_AXIS)
    x = jax.device_put(jnp.ones((tp * rows, hidden_size), dtype), NamedSharding(mesh, spec))
    call = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, parallel.TP_AXIS), mesh=mesh,
                                 in_specs=spec, out_specs=spec, check_vma=False))
    return call, x

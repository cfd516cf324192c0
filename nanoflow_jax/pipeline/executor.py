"""Turns a `Schedule` into the function that runs all decoder layers of `llama.forward`.

Activations live as *pieces*: for each tensor (and layer) a set of token ranges [s, e) with
their arrays,

    x        [e-s, D]         the residual stream (one for all layers: each row's latest value)
    q, k, v  [e-s, H·, Dh]    written by qkv (after RoPE), one per layer
    attn     [e-s, Hq, Dh]    written by attn, which also writes the rows' K/V into the cache
    gate_up  [e-s, 2F]        written by up_gate
    x_attn   [e-s, D]         under tensor parallelism: the residual stream summed over the
    x_mlp    [e-s, D]         shards by ar_attn / ar_mlp, read by qkv / up_gate, one per layer

An op reads its rows (the piece itself when the ranges match, a concatenation otherwise) and
writes a new piece, so nano-batches copy no whole-batch buffers and their chains of ops stay
independent in the dataflow, which is what lets XLA run them at once. The KV cache is threaded
through the attn ops in schedule order: every attention runs after the K/V writes of the
tokens before it (the schedule checks that attention runs in token order).

On a GPU an op with `stream > 0` runs inside `compute_on("gpu_stream:N")` (its own CUDA
stream); consecutive ops with the same stream and group are one such call, so a GEMM chain
costs one join. Ops of one group (per window) form one XLA scheduling group. Everywhere else
streams are ignored and the schedule only orders the work, which is how the CPU tests compare
it with the sequential schedule.

Tensor parallelism: inside `parallel.sharded_forward` (a config with `tp_axis`) the schedule
runs with its collective ops (`Schedule.with_collectives` adds them where it has none); each
is one `lax.psum` of its rows of the partial residual stream, issued on the main stream
outside every stream call, and the GEMM ops then read the summed rows instead of summing
inside their norm. Nano-batch i's all-reduce thus depends on nano-batch i's producer only,
and XLA's async collectives run it under the GEMMs of the other nano-batches. On one device
the collective ops are dropped.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.kv_cache import write_kv
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import slice_metadata
from nanoflow_jax.pipeline import in_sm
from nanoflow_jax.pipeline.schedule import COLLECTIVES, REDUCES_FOR, Schedule


def inline_nested_jits(fn):
    """`fn` with every nested `jax.jit` (e.g. `jax.nn.silu`, the Pallas kernels' wrappers)
    evaluated inline.

    Why: inside a `compute_on` body a nested jit lowers to a call that XLA also turns into an
    async `call-start` carrying the stream annotation, and its stream assignment then fails with
    "No ExecutionStreamId found" (measured, JAX 0.11.2 on an H100). One flat body is one call.
    """
    from jax.extend import core as jcore

    def run(jaxpr, consts, args):
        env = {}

        def read(var):
            return var.val if isinstance(var, jcore.Literal) else env[var]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(var) for var in eqn.invars]
            if eqn.primitive.name in ("pjit", "jit"):
                inner = eqn.params["jaxpr"]
                outvals = run(inner.jaxpr, inner.consts, invals)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                subfuns, params = params if isinstance(params, tuple) else ((), params)
                with eqn.ctx.manager:  # e.g. compute_on / name stack context of the eqn
                    outvals = eqn.primitive.bind(*subfuns, *invals, **params)
                if not eqn.primitive.multiple_results:
                    outvals = [outvals]
            env.update(zip(eqn.outvars, outvals))
        return [read(var) for var in jaxpr.outvars]

    @functools.wraps(fn)
    def flat(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = run(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return flat


def on_stream(fn, stream: int):
    """`fn` issued on XLA GPU stream `stream` (`compute_on`, named `compute_on2` in JAX 0.10),
    with its nested jits inlined so that XLA can place the whole body on that stream."""
    from jax.experimental import compute_on as co

    wrap = getattr(co, "compute_on2", None) or co.compute_on
    return wrap(inline_nested_jits(fn), compute_type=f"gpu_stream:{stream}",
                out_memory_spaces=jax.memory.Space.Device)


READS = {"qkv": ("x",), "attn": ("q", "k", "v"), "o_proj": ("attn", "x"),
         "up_gate": ("x",), "down": ("gate_up", "x"), "ar_attn": ("x",), "ar_mlp": ("x",)}
WRITES = {"qkv": ("q", "k", "v"), "attn": ("attn",), "o_proj": ("x",), "up_gate": ("gate_up",),
          "down": ("x",), "ar_attn": ("x_attn",), "ar_mlp": ("x_mlp",)}
SUMMED = {"ar_attn": "x_attn", "ar_mlp": "x_mlp"}


def reads(kind: str, collectives: bool) -> tuple[str, ...]:
    """The tensors op `kind` reads: with collective ops, qkv and up_gate read the summed rows."""
    if collectives and kind in REDUCES_FOR:
        return (SUMMED[REDUCES_FOR[kind]],)
    return READS[kind]


def _key(name: str, layer: int) -> tuple[str, int]:
    return (name, -1 if name == "x" else layer)  # the residual stream is one for all layers


class _Pieces:
    """The token ranges of one tensor: disjoint [(start, end, array)], sorted by start."""

    def __init__(self, parts=()):
        self.parts = sorted(parts, key=lambda p: p[0])

    def overlapping(self, start: int, end: int):
        return [p for p in self.parts if p[0] < end and p[1] > start]

    def read(self, start: int, end: int) -> jax.Array:
        parts = self.overlapping(start, end)
        if len(parts) == 1 and parts[0][:2] == (start, end):
            return parts[0][2]
        if sum(min(e, end) - max(s, start) for s, e, _ in parts) != end - start:
            raise AssertionError(f"rows {start}..{end} read before they are written")
        return jnp.concatenate([a[max(s, start) - s:min(e, end) - s] for s, e, a in parts])

    def write(self, start: int, end: int, array) -> None:
        kept = []
        for s, e, a in self.parts:
            if e <= start or s >= end:
                kept.append((s, e, a))
                continue
            if s < start:  # trim, keeping the rows outside [start, end)
                kept.append((s, start, None if a is None else a[:start - s]))
            if e > end:
                kept.append((end, e, None if a is None else a[end - s:]))
        self.parts = sorted(kept + [(start, end, array)], key=lambda p: p[0])


class _State:
    """Pieces of every tensor, the KV cache of every layer, and the step's constants."""

    def __init__(self, pieces, caches, consts, prewritten=frozenset(), gemm_on=None,
                 tp_axis=None, collectives=False):
        self.gemm_on = gemm_on  # share of the SMs -> matmul on that share (None: jnp.matmul)
        # The mesh axis the collective ops sum over (None: one device), and whether the
        # schedule has them (then qkv and up_gate read their output and sum nothing).
        self.tp_axis, self.collectives = tp_axis, collectives
        self.pieces: dict[tuple[str, int], _Pieces] = pieces
        self.caches: dict[int, object] = caches
        self.consts = consts  # {"layer": {l: params}, "pos": {(s, e): [e-s]}, "meta": {(s, e): ·}}
        self.prewritten = prewritten  # (layer, start, end) of attn ops whose K/V are written
        # Outputs of the side-stream calls that read a layer's cache since its last write: a
        # write waits for them (a barrier), so XLA need not copy the cache to keep it intact.
        self.readers: dict[int, list] = {}

    def cache_to_write(self, layer: int):
        """The layer's cache, ordered after the side-stream calls still reading it."""
        if self.readers.get(layer):
            self.caches[layer], _ = jax.lax.optimization_barrier(
                (self.caches[layer], self.readers.pop(layer)))
        return self.caches[layer]

    def write_rows_kv(self, layer: int, start: int, end: int) -> None:
        """Writes the rows' K/V into the layer's cache in place."""
        k, v = (self.pieces[_key(n, layer)].read(start, end) for n in ("k", "v"))
        self.caches[layer] = write_kv(*self.cache_to_write(layer), k, v,
                                      self.consts["meta"][start, end].slots)

    def run(self, op, layer: int, config: ModelConfig, attention) -> None:
        s, e = op.start, op.end
        w = self.consts["layer"][layer]
        mm = {} if op.sm_share == 1 or self.gemm_on is None else {
            "matmul": self.gemm_on(op.sm_share)}
        read = lambda name: self.pieces[_key(name, layer)].read(s, e)  # noqa: E731
        x_in = lambda: read(reads(op.op, self.collectives)[0])
        if op.op in COLLECTIVES:
            x = read("x")  # [e-s, D], this shard's partial sum
            outs = (x if self.tp_axis is None else jax.lax.psum(x, self.tp_axis),)
        elif op.op == "qkv":
            outs = llama.split_rope(llama.qkv_proj(w, x_in(), config, **mm),
                                    self.consts["pos"][s, e], config)
        elif op.op == "attn":
            kwargs = {} if op.sm_share == 1 else {"sm_share": op.sm_share}
            writes = (layer, s, e) not in self.prewritten
            if not writes:
                kwargs["write"] = False
            cache = self.cache_to_write(layer) if writes else self.caches[layer]
            # The layer's own sliding window (None: the whole context).
            out, cache = llama.layer_attention(attention, config, layer)(
                read("q"), read("k"), read("v"), cache, self.consts["meta"][s, e], **kwargs)
            if writes:
                self.caches[layer] = cache
            outs = (out,)
        elif op.op == "o_proj":
            outs = (llama.o_proj(w, read("attn"), read("x"), **mm),)
        elif op.op == "up_gate":
            outs = (llama.up_gate_proj(w, x_in(), config, **mm),)
        else:
            outs = (llama.down_proj(w, read("gate_up"), read("x"), **mm),)
        for name, out in zip(WRITES[op.op], outs):
            self.pieces.setdefault(_key(name, layer), _Pieces()).write(s, e, out)


def _calls(flat, use_streams: bool):
    """Splits the flattened (window, op) list into calls: runs of consecutive ops with the same
    stream > 0 and group in one window; every other op is a call of its own (stream 0)."""
    calls = []
    for w, op in flat:
        key = (w, op.stream, op.group) if use_streams and op.stream > 0 else None
        if calls and key is not None and calls[-1][0] == key:
            calls[-1][1].append((w, op))
        else:
            calls.append((key, [(w, op)]))
    return calls


class _Origin:
    """Stands for a piece outside the call in `_call_inputs`' dry run; its rows are its own."""

    def __init__(self, start: int, end: int):
        self.range = (start, end)

    def __getitem__(self, rows):
        return self


def _call_inputs(state: _State, ops):
    """What a call reads from outside: {(tensor key, start, end): whole piece} and the cache
    layers it updates, found by replaying its ops' reads and writes on the pieces' ranges."""
    layout = {k: _Pieces([(s, e, _Origin(s, e)) for s, e, _ in p.parts])
              for k, p in state.pieces.items()}
    used, caches = set(), []
    for w, op in ops:
        layer = w + op.layer
        for name in reads(op.op, state.collectives):
            for _, _, origin in layout[_key(name, layer)].overlapping(op.start, op.end):
                if origin is not None:  # None: rows written earlier in this call
                    used.add((_key(name, layer),) + origin.range)
        if op.op == "attn" and layer not in caches:
            caches.append(layer)
        for name in WRITES[op.op]:
            layout.setdefault(_key(name, layer), _Pieces()).write(op.start, op.end, None)
    inputs = {(k, s, e): a for k, p in state.pieces.items() for s, e, a in p.parts
              if (k, s, e) in used}
    return inputs, caches


def persistent_gemm(sm_share: float):
    """The matmul of a GEMM op given `sm_share` of the SMs: the persistent Mosaic GPU GEMM on
    that many CTAs (at least one)."""
    from pallas_kernels import _compat
    from pallas_kernels.persistent_matmul import persistent_matmul

    return functools.partial(persistent_matmul,
                             num_programs=max(1, round(sm_share * _compat.num_sms())))


def make_layers_fn(schedule: Schedule, use_streams: bool | None = None, wrap_call=on_stream,
                   gemm_on=None, beside=None):
    """A function with `llama.run_layers`' signature running `schedule`'s nano-ops.

    `use_streams`: None = on a GPU only. `wrap_call(fn, stream)` issues a call on a stream
    (tests swap in `jax.jit` to check the calls' plumbing on the CPU). `gemm_on(sm_share)` gives
    the matmul of GEMM ops with `sm_share` < 1: None = `persistent_gemm` on a GPU, elsewhere
    jnp.matmul (like streams, SM shares only shape the work on a GPU). A bucket whose schedule
    has `in_sm_rows` runs `in_sm.run_layers` instead (`beside`: its GEMM-beside-attention op,
    None = that of the attention's impl; `in_sm_fused` False: the two as separate kernels).
    """
    if use_streams is None:
        use_streams = jax.default_backend() == "gpu"
    if gemm_on is None and jax.default_backend() == "gpu":
        gemm_on = persistent_gemm

    def run_layers(layers, x, positions, kv_cache, meta, config: ModelConfig, attention):
        t, num_layers = x.shape[0], len(layers)
        sched = schedule.for_tokens(t)
        if sched.in_sm_rows:
            return in_sm.run_layers(sched.in_sm_rows, layers, x, positions, kv_cache, meta,
                                    config, attention, beside, sched.in_sm_fused)
        tp_axis = config.tp_axis
        sched = sched.with_collectives() if tp_axis else sched.without_collectives()
        if tp_axis:  # the collective ops sum the residual: the GEMM ops' norms must not
            config = dataclasses.replace(config, tp_axis=None)
        flat = sched.flatten(num_layers)
        ranges = {(o.start, o.end) for o in sched.ops}
        consts = {"layer": dict(enumerate(layers)),
                  "pos": {(s, e): positions[s:e] for s, e in ranges},
                  "meta": {(s, e): slice_metadata(meta, s, e) for s, e in ranges}}
        caches = dict(enumerate(kv_cache or [None] * num_layers))
        state = _State({_key("x", 0): _Pieces([(0, t, x)])}, caches, consts, gemm_on=gemm_on,
                       tp_axis=tp_axis, collectives=sched.has_collectives)
        groups = 1 + max(o.group for o in sched.ops)
        for key, ops in _calls(flat, use_streams):
            if key is None:
                (w, op), = ops
                state.run(op, w + op.layer, config, attention)
                continue
            w, stream, group = key
            # K/V the call does not compute itself are written here, on the main stream, so
            # the call only reads the cache: a side-stream call that updated it in place
            # would make XLA copy the whole cache (measured: 123 ms steps, then out of memory).
            computed = {w_ + o.layer for w_, o in ops if o.op == "qkv"}
            prewritten = set()
            for w_, o in ops:
                if o.op == "attn" and w_ + o.layer not in computed:
                    state.write_rows_kv(w_ + o.layer, o.start, o.end)
                    prewritten.add((w_ + o.layer, o.start, o.end))
            inputs, cache_layers = _call_inputs(state, ops)
            used = {w_ + o.layer for w_, o in ops}
            call_consts = {"layer": {l: layers[l] for l in used},
                           "pos": {(o.start, o.end): consts["pos"][o.start, o.end]
                                   for _, o in ops if o.op == "qkv"},
                           "meta": {(o.start, o.end): consts["meta"][o.start, o.end]
                                    for _, o in ops if o.op == "attn"}}

            def body(inputs, caches, call_consts, ops=ops, prewritten=frozenset(prewritten)):
                parts = {}
                for (k, s, e), a in inputs.items():
                    parts.setdefault(k, []).append((s, e, a))
                local = _State({k: _Pieces(p) for k, p in parts.items()}, dict(caches),
                               call_consts, prewritten, gemm_on, tp_axis,
                               sched.has_collectives)
                for w_, op in ops:
                    local.run(op, w_ + op.layer, config, attention)
                given = {id(a) for a in inputs.values()}
                written = {(k, s, e): a for k, p in local.pieces.items()
                           for s, e, a in p.parts if id(a) not in given}
                return written, {l: c for l, c in local.caches.items() if c is not caches[l]}

            call = wrap_call(body, stream)
            args = (inputs, {l: state.caches[l] for l in cache_layers}, call_consts)
            if group:
                from jax.experimental.xla_metadata import set_xla_metadata

                # One id per (window, group): XLA's scheduling groups must not span layers.
                with set_xla_metadata(_scheduling_group_id=str((w + sched.windows) * groups
                                                               + group)):
                    written, caches = call(*args)
            else:
                written, caches = call(*args)
            for (k, s, e), a in written.items():
                state.pieces.setdefault(k, _Pieces()).write(s, e, a)
            state.caches.update(caches)
            for l in cache_layers:  # read, not written, by the call: later writes wait for it
                if l not in caches:
                    state.readers.setdefault(l, []).extend(written.values())
        x = state.pieces[_key("x", 0)].read(0, t)
        return x, None if kv_cache is None else [state.caches[l] for l in range(num_layers)]

    return run_layers

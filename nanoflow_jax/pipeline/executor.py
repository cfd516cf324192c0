"""Turns a `Schedule` into the decoder-layer function that `llama.forward` runs.

Each nano-op reads and writes whole-batch buffers through static token slices:

    x        [T, D]        residual stream (o_proj and down add into their rows)
    q, k, v  [T, H·, Dh]   written by qkv (after RoPE)
    attn     [T, Hq, Dh]   written by attn, which also writes the rows' K/V into the cache
    gate_up  [T, 2F]       written by up_gate

so ops of different kinds may use different boundaries. The KV cache is threaded through the
attn ops in schedule order, which orders every attention after the KV writes of the tokens
before it. On a GPU, an op with `stream > 0` is wrapped in `compute_on("gpu_stream:N")`
(XLA issues it on its own CUDA stream); everywhere else streams are ignored and the schedule
only changes the order of the work, which is how the CPU tests compare it with the sequential
schedule.
"""
from __future__ import annotations

import functools

import jax

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import slice_metadata
from nanoflow_jax.pipeline.schedule import Schedule


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


def make_layer_fn(schedule: Schedule, use_streams: bool | None = None):
    """A function with `llama.decoder_layer`'s signature running `schedule`'s nano-ops.

    `use_streams`: None = on a GPU only.
    """
    if use_streams is None:
        use_streams = jax.default_backend() == "gpu"

    def issue(fn, stream: int, group: int = 0):
        if not (use_streams and stream > 0):
            return fn
        issued = on_stream(fn, stream)
        if not group:
            return issued

        def grouped(*args):
            from jax.experimental.xla_metadata import set_xla_metadata

            with set_xla_metadata(_scheduling_group_id=str(group)):
                return issued(*args)

        return grouped

    def layer_fn(layer, x, positions, layer_cache, meta, config: ModelConfig, attention):
        t = x.shape[0]
        sched = schedule.for_tokens(t)
        q = k = v = attn = gate_up = None
        for op in sched.ops:
            s, e = op.start, op.end
            if op.op == "qkv":
                def qkv(layer, xs, pos):
                    return llama.split_rope(llama.qkv_proj(layer, xs, config), pos, config)

                qs, ks, vs = issue(qkv, op.stream, op.group)(layer, x[s:e], positions[s:e])
                if q is None:
                    q = jax.numpy.zeros((t,) + qs.shape[1:], qs.dtype)
                    k = jax.numpy.zeros((t,) + ks.shape[1:], ks.dtype)
                    v = jax.numpy.zeros((t,) + vs.shape[1:], vs.dtype)
                q, k, v = q.at[s:e].set(qs), k.at[s:e].set(ks), v.at[s:e].set(vs)
            elif op.op == "attn":
                def attend(qs, ks, vs, cache, m):
                    return attention(qs, ks, vs, cache, m)

                out, layer_cache = issue(attend, op.stream, op.group)(
                    q[s:e], k[s:e], v[s:e], layer_cache, slice_metadata(meta, s, e))
                attn = (jax.numpy.zeros_like(q) if attn is None else attn).at[s:e].set(out)
            elif op.op == "o_proj":
                o_proj = issue(llama.o_proj, op.stream, op.group)
                x = x.at[s:e].set(o_proj(layer, attn[s:e], x[s:e]))
            elif op.op == "up_gate":
                up_gate = issue(functools.partial(llama.up_gate_proj, config=config),
                                op.stream, op.group)
                gu = up_gate(layer, x[s:e])
                gate_up = (jax.numpy.zeros((t, gu.shape[1]), gu.dtype) if gate_up is None
                           else gate_up).at[s:e].set(gu)
            else:  # down
                down = issue(llama.down_proj, op.stream, op.group)
                x = x.at[s:e].set(down(layer, gate_up[s:e], x[s:e]))
        return x, layer_cache

    return layer_fn

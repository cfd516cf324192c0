"""The measured guard of the auto-search: the searched schedule and sequential timed on the
device, and the searched one kept only when it measures faster.

The search's prediction rests on op times measured alone and on pairs (`predict.py`); a step
compiled as a whole can still run otherwise. `choose` times both schedules with a `measure`
callable (schedule -> ms per step of the decoder layers) and keeps the searched schedule only
when it measures more than `min_gain` faster than sequential; it logs predicted and measured
times of both. `layer_timer` is that callable on the device: a few layers of the model run by
the schedule over the workload's dense batch (its decode rows reading distinct KV pages, one
prompt chunk), calls enqueued back to back (`benchmarks.timing.device_ms_per_call`), scaled to
the model's layers. `engine_timer` gives it to `schedule="auto"` at engine start-up when
`EngineConfig.schedule_guard` asks for it (default: on a GPU).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from nanoflow_jax.pipeline.schedule import Schedule, sequential

log = logging.getLogger("nanoflow_jax")

Measure = Callable[[Schedule], float]  # ms per step of the decoder layers


@dataclasses.dataclass(frozen=True)
class Verdict:
    schedule: Schedule  # the one kept
    searched_ms: float  # measured, ms per step of the decoder layers
    sequential_ms: float
    kept_searched: bool


def choose(searched: Schedule, predicted_ms: float, sequential_predicted_ms: float,
           measure: Measure, min_gain: float) -> Verdict:
    """Times `searched` and sequential with `measure`; keeps `searched` only when it measures
    under (1 - min_gain) of sequential. Logs both predictions and measurements."""
    seq = sequential(searched.num_tokens, searched.concurrent)
    seq_ms = measure(seq)
    searched_ms = measure(searched)
    keep = searched_ms < (1 - min_gain) * seq_ms
    for name, pred, ms in ((searched.name, predicted_ms, searched_ms),
                           (seq.name, sequential_predicted_ms, seq_ms)):
        log.info("autosearch guard: %s predicted %.3f ms, measured %.3f ms per step of layers "
                 "(%+.1f %%)", name, pred, ms, 100 * (pred - ms) / ms)
    log.info("autosearch guard: keeps %s (%s)", searched.name if keep else seq.name,
             f"{100 * (1 - searched_ms / seq_ms):.1f} % faster" if keep else
             f"the searched schedule does not measure {100 * min_gain:g} % faster")
    return Verdict(searched if keep else seq, searched_ms, seq_ms, keep)


def layer_timer(layer_params: list, model_config, workload, num_tokens: int, dtype: str,
                page_size: int = 16, attention_impl: str = "auto", layers: int = 4,
                steps: int = 5, repeats: int = 3, kv_pool_bytes: int | None = None,
                time_call=None) -> Measure:
    """`measure(schedule)`: device ms of the decoder layers of one step of `schedule`, timed
    over the first `layers` of `layer_params` (the model's per-layer params) and scaled to
    `model_config.num_layers`; `steps` calls back to back, median of `repeats`. Decode rows
    read distinct pages of a pool of `kv_pool_bytes` per layer (None: 1 GiB on a GPU, 16 MiB
    elsewhere), reused round robin beyond it. `time_call(fn, calls=, repeats=)` times the
    calls (None: `benchmarks.timing.device_ms_per_call`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanoflow_jax.batch import BatchShape, SeqChunk, build_batch
    from nanoflow_jax.benchmarks.timing import device_ms_per_call
    from nanoflow_jax.kv_cache import page_bytes
    from nanoflow_jax.models import llama
    from nanoflow_jax.models.paged_attention import attention_fn
    from nanoflow_jax.pipeline.executor import make_layers_fn

    on_gpu = jax.default_backend() == "gpu"
    used = layer_params[:layers]
    jdtype = jnp.dtype(dtype)
    nd, ctx = min(workload.num_decode, num_tokens), workload.decode_context
    pages_per = -(-(ctx + 1) // page_size)
    chunk = num_tokens - nd
    chunk_pages = -(-chunk // page_size)
    per_page = page_bytes(model_config, page_size, jdtype) // model_config.num_layers
    pool = (kv_pool_bytes or ((1 << 30) if on_gpu else (16 << 20))) // per_page
    num_pages = max(pages_per + chunk_pages, min(nd * pages_per + chunk_pages, pool))
    decodes = [SeqChunk([0], ctx, [(r * pages_per + j) % (num_pages - chunk_pages)
                                   for j in range(pages_per)]) for r in range(nd)]
    prefills = [SeqChunk(list(range(chunk)), 0, list(range(num_pages - chunk_pages,
                                                           num_pages)))] if chunk else []
    batch = jax.device_put(build_batch(decodes, prefills,
                                       BatchShape(num_tokens, nd, 1, max(pages_per, chunk_pages)),
                                       page_size))
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal(
        (num_tokens, model_config.hidden_size)), jdtype))
    attention = attention_fn(attention_impl)

    def measure(schedule: Schedule) -> float:
        layers_fn = (llama.run_layers if schedule.is_sequential
                     else make_layers_fn(schedule.for_tokens(num_tokens)))
        step = jax.jit(lambda params, x, kv: layers_fn(params, x, batch.positions, kv,
                                                       batch.attn, model_config, attention),
                       donate_argnums=(2,),
                       compiler_options=schedule.compiler_options() if on_gpu else None)
        shape = (model_config.num_kv_heads, num_pages, page_size, model_config.head_dim)
        held = [[(jnp.zeros(shape, jdtype), jnp.zeros(shape, jdtype)) for _ in used]]

        def once():
            out, held[0] = step(used, x, held[0])
            return out

        ms = (time_call or device_ms_per_call)(once, calls=steps, repeats=repeats)
        del held[0]
        return ms * model_config.num_layers / len(used)

    return measure


def engine_timer(config, params, model_config) -> Measure | None:
    """The guard's `measure` for an engine (`EngineConfig` resolved for its backend) whose
    schedule is searched at start-up; None when `schedule_guard` ("auto": on a GPU) leaves it
    off, the schedule is not searched, or the model is split over devices."""
    import jax

    from nanoflow_jax.pipeline.autosearch import Workload

    on = config.schedule_guard == "on" or (config.schedule_guard == "auto"
                                           and jax.default_backend() == "gpu")
    searched = isinstance(config.schedule, str) and config.schedule.split(":")[0] == "auto"
    if not on or not searched:
        return None
    if config.tensor_parallel_size > 1:
        log.info("autosearch guard: off under tensor parallelism (the timer runs one device)")
        return None
    t = config.max_num_batched_tokens
    return layer_timer(params["layers"], model_config, Workload.default(t), t, config.dtype,
                       config.page_size, config.attention_impl)

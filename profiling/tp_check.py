"""Tensor parallelism on real devices: TP N's logits against TP 1's, the all-reduces in the
compiled step, and the step's device time, for the sequential and a nano-batch schedule.

A model preset with its real layer shapes, cut to --num_layers (so TP 1 fits one device),
random bf16 weights, a mixed paged batch (decodes with context + prompt chunks), the paged
attention kernels on a GPU. Prints one JSON line per schedule.

    python3 profiling/tp_check.py --model=llama-3-70b --tensor_parallel_size=8
    # CPU, tiny:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python3 profiling/tp_check.py --model=tiny-llama --tensor_parallel_size=2 \\
        --num_tokens=128 --repeats=2
"""
import dataclasses
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on these machines

from absl import app, flags

flags.DEFINE_string("model", "llama-3-70b", "Preset name (random weights).")
flags.DEFINE_integer("tensor_parallel_size", 8, "Devices in the mesh.")
flags.DEFINE_integer("num_layers", 2, "Layers kept (TP 1 must fit one device).")
flags.DEFINE_integer("num_tokens", 1024, "Dense batch: tokens per step.")
flags.DEFINE_integer("num_decode", 256, "Decode rows of the batch (the rest: prompt chunks).")
flags.DEFINE_list("schedules", ["sequential", "nano2-pipe-nostreams", "nano2"],
                  "Schedules to run (a failing one prints its error and the rest still run).")
flags.DEFINE_integer("repeats", 20, "Timed steps per schedule (median reported).")
FLAGS = flags.FLAGS


def _batch(rng, config, num_tokens, num_decode, page, num_pages):
    from nanoflow_jax.batch import BatchShape, SeqChunk, build_batch

    pages = iter(rng.permutation(num_pages).tolist())
    take = lambda n: [next(pages) for _ in range(n)]
    decodes = []
    for ctx in rng.integers(64, 512, num_decode):
        decodes.append(SeqChunk([int(rng.integers(config.vocab_size))], int(ctx),
                                take(-(-(int(ctx) + 1) // page))))
    left, prefills = num_tokens - num_decode, []
    while left > 0:
        n, prior = min(left, 256), int(rng.integers(0, 128))
        prefills.append(SeqChunk(rng.integers(0, config.vocab_size, n).tolist(), prior,
                                 take(-(-(prior + n) // page))))
        left -= n
    shape = BatchShape(num_tokens=num_tokens, num_decode=num_decode,
                       num_prefill_seqs=len(prefills), max_pages=48)
    return build_batch(decodes, prefills, shape, page)


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanoflow_jax import parallel, weights
    from nanoflow_jax.config import get_preset
    from nanoflow_jax.kv_cache import init_kv_cache
    from nanoflow_jax.models import llama
    from nanoflow_jax.models.paged_attention import attention_fn
    from nanoflow_jax.pipeline.executor import make_layers_fn
    from nanoflow_jax.pipeline.spec import named_schedule

    tp = FLAGS.tensor_parallel_size
    config = dataclasses.replace(get_preset(FLAGS.model), num_layers=FLAGS.num_layers)
    t, page = FLAGS.num_tokens, 16
    num_pages = 33 * FLAGS.num_decode + 25 * (t // 256 + 2)  # contexts < 512, chunks <= 384
    rng = np.random.default_rng(0)
    batch = _batch(rng, config, t, FLAGS.num_decode, page, num_pages)
    rows = np.flatnonzero(batch.attn.slots >= 0)
    attention = attention_fn("auto")
    on_gpu = jax.default_backend() == "gpu"
    mesh = parallel.make_mesh(tp)

    full = weights.random_params(config, "bfloat16", seed=0)
    kv = init_kv_cache(config, num_pages, page, jnp.bfloat16)
    kv = [tuple(jax.random.normal(jax.random.key(i), a.shape, a.dtype) for a in layer)
          for i, layer in enumerate(kv)]
    heads = [parallel.kv_head_start(config, tp, i) + j for i in range(tp)
             for j in range(parallel.kv_heads_per_shard(config, tp))]
    kv_tp = [tuple(jax.device_put(a[np.asarray(heads)], parallel.kv_sharding(mesh))
                   for a in layer) for layer in kv]
    params = parallel.shard_params(full, config, mesh)

    def step_fn(schedule, m):
        layers_fn = llama.run_layers if schedule.is_sequential else make_layers_fn(schedule)
        options = {**schedule.compiler_options(), **parallel.compiler_options(m, schedule)}

        def step(p, kv, b):
            return parallel.forward_fn(m)(p, config, b.token_ids, b.positions, kv, b.attn,
                                          jnp.arange(t), attention, layers_fn)
        return jax.jit(step, compiler_options=options if on_gpu else None)

    def check(name):
        schedule = named_schedule(name, t)
        want = np.asarray(step_fn(schedule, None)(full, kv, batch)[0], np.float32)[rows]
        run = step_fn(schedule, mesh)
        hlo = run.lower(params, kv_tp, batch).compile().as_text()
        got = np.asarray(run(params, kv_tp, batch)[0], np.float32)[rows]
        times = []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, kv_tp, batch))
            times.append(time.perf_counter() - t0)
        step_ms = 1e3 * float(np.median(times))
        return {"rel_err_vs_tp1": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                "all_reduce_ops": hlo.count("all-reduce-start(") + hlo.count("all-reduce("),
                "step_ms_median": step_ms, "ms_per_layer": step_ms / config.num_layers}

    for name in FLAGS.schedules:
        row = {"model": FLAGS.model, "num_layers": config.num_layers,
               "tensor_parallel_size": tp, "schedule": name, "num_tokens": t,
               "backend": jax.default_backend()}
        try:
            row.update(check(name))
        except Exception as e:  # noqa: BLE001  (one schedule failing is a result too)
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)

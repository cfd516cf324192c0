"""Tensor parallelism on real devices: TP N's logits against TP 1's, the all-reduces in the
compiled step and whether XLA overlaps them with GEMMs, and the step's device time, per
schedule.

A model preset with its real layer shapes, cut to --num_layers (so TP 1 fits one device),
random bf16 weights, a mixed paged batch (decodes with context + prompt chunks), the paged
attention kernels on a GPU. Prints one JSON line per schedule, then a table.

Overlap of the schedule's collective ops (`ar_attn`, `ar_mlp`) with other nano-batches' GEMMs
is read two ways:
  - the compiled step (GPU: scheduled HLO): how many async all-reduces have a GEMM issued
    between their start and their done (the latency hiding scheduler's placement);
  - with --trace_dir, a profiler trace of --trace_steps steps on device 0: the NCCL kernels'
    time per step and how much of it ran while a GEMM kernel ran (what the GPU did).
A sequential schedule has nothing to put under its all-reduces; a nano-batch schedule's
all-reduces should run under the other nano-batch's GEMMs.

    PYTHONPATH=. python3 profiling/tp_check.py --model=llama-3-70b --tensor_parallel_size=8 \\
        --trace_dir=/tmp/tp_traces
    # CPU, tiny:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python3 profiling/tp_check.py --model=tiny-llama --tensor_parallel_size=2 \\
        --num_tokens=128 --repeats=2
"""
import dataclasses
import json
import os
import re

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on these machines

from absl import app, flags

flags.DEFINE_string("model", "llama-3-70b", "Preset name (random weights).")
flags.DEFINE_integer("tensor_parallel_size", 8, "Devices in the mesh.")
flags.DEFINE_integer("num_layers", 2, "Layers kept (TP 1 must fit one device).")
flags.DEFINE_integer("num_tokens", 1024, "Dense batch: tokens per step.")
flags.DEFINE_integer("num_decode", 256, "Decode rows of the batch (the rest: prompt chunks).")
flags.DEFINE_list("schedules", ["sequential", "nano2", "nano2-ar", "nano2-pipe-nostreams-ar"],
                  "Schedules to run (a failing one prints its error and the rest still run).")
flags.DEFINE_integer("repeats", 20, "Timings per schedule, each of 5 steps back to back "
                     "(median device ms per step reported).")
flags.DEFINE_string("trace_dir", "", "Trace --trace_steps steps per schedule under this folder "
                    "and report the NCCL kernels' overlap with GEMMs (default: $OUT/tp_traces "
                    "when $OUT is set, else no trace).")
flags.DEFINE_integer("trace_steps", 3, "Steps per trace.")
FLAGS = flags.FLAGS

GEMM_KERNELS = ("gemm", "xmma", "nvjet", "cutlass", "matmul")  # cuBLAS, XLA's Triton GEMMs


def hlo_overlap(hlo: str) -> dict:
    """Async all-reduces in the scheduled HLO and how many have a GEMM (a cuBLAS custom call or
    a GEMM fusion) issued between their start and their done, in each computation's order."""
    starts = under = 0
    open_ = {}  # start name -> GEMMs issued since
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation's header or its closing brace
            open_.clear()
            continue
        code = line.split(", metadata=")[0]
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*\ball-reduce-start\(", code)
        if m:
            starts += 1
            open_[m.group(1)] = 0
            continue
        m = (re.search(r"\ball-reduce-done\([^%]*%([\w.\-]+)", code)
             or re.search(r"\ball-reduce-done\(([\w.\-]+)\)", code))
        if m:
            under += open_.pop(m.group(1), 0) > 0
        elif " = " in code and any(k in code.lower() for k in GEMM_KERNELS):
            for name in open_:
                open_[name] += 1
    return {"async_all_reduces": starts, "all_reduces_with_gemm_under": under}


def _union(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length_of_both(a, b) -> float:
    """Total time both unions of intervals cover."""
    a, b, i, j, total = _union(a), _union(b), 0, 0, 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def trace_overlap(folder: str, steps: int) -> dict:
    """NCCL kernel time per step on device 0, and how much of it a GEMM kernel ran beside."""
    import glob

    from jax.profiler import ProfileData
    from trace_summary import kernel_events

    path = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True),
               key=os.path.getmtime)
    events = kernel_events(ProfileData.from_file(path), "/device:GPU:0")
    nccl = [(s, e) for name, s, e in events if "nccl" in name.lower()]
    gemm = [(s, e) for name, s, e in events
            if "nccl" not in name.lower() and any(k in name.lower() for k in GEMM_KERNELS)]
    per = 1e-6 / steps  # ns -> ms per step
    return {"nccl_ms": sum(e - s for s, e in _union(nccl)) * per,
            "nccl_under_gemm_ms": _length_of_both(nccl, gemm) * per,
            "nccl_kernels": len(nccl) / steps}


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
    from nanoflow_jax.benchmarks.timing import device_ms_per_call
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
        step_ms = device_ms_per_call(run, params, kv_tp, batch, calls=5, repeats=FLAGS.repeats)
        out = {"rel_err_vs_tp1": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
               "all_reduce_ops": hlo.count("all-reduce-start(") + hlo.count("all-reduce("),
               **hlo_overlap(hlo), "step_ms": step_ms,
               "ms_per_layer": step_ms / config.num_layers}
        if trace_dir:
            folder = os.path.join(trace_dir, re.sub(r"\W", "_", name))
            with jax.profiler.trace(folder):
                jax.block_until_ready([run(params, kv_tp, batch)
                                       for _ in range(FLAGS.trace_steps)])
            out.update(trace_overlap(folder, FLAGS.trace_steps))
        return out

    out_dir = os.environ.get("OUT")
    trace_dir = FLAGS.trace_dir or (os.path.join(out_dir, "tp_traces") if out_dir else "")
    if not on_gpu:
        trace_dir = ""  # the trace's kernel lines are a GPU's
    rows_out = []

    for name in FLAGS.schedules:
        row = {"model": FLAGS.model, "num_layers": config.num_layers,
               "tensor_parallel_size": tp, "schedule": name, "num_tokens": t,
               "backend": jax.default_backend()}
        try:
            row.update(check(name))
        except Exception as e:  # noqa: BLE001  (one schedule failing is a result too)
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "tp_check.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows_out)
    print(f"\n{FLAGS.model}, {config.num_layers} layers, TP {tp}, T={t}, "
          f"{jax.default_backend()}")
    print("schedule | rel err vs TP 1 | ms/step | all-reduces (async) | with GEMM under (HLO) "
          "| NCCL ms/step | NCCL under GEMM ms/step")
    for r in rows_out:
        if "error" in r:
            print(f"{r['schedule']} | error: {r['error'][:100]}")
            continue
        print(f"{r['schedule']} | {r['rel_err_vs_tp1']:.2e} | {r['step_ms']:.3f} | "
              f"{r['all_reduce_ops']} ({r['async_all_reduces']}) | "
              f"{r['all_reduces_with_gemm_under']} | {r.get('nccl_ms', float('nan')):.3f} | "
              f"{r.get('nccl_under_gemm_ms', float('nan')):.3f}")


if __name__ == "__main__":
    app.run(main)

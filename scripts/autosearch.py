"""Profile the ops, search a nano-batch schedule, and compare predicted and measured times.

    PYTHONPATH=. python3 scripts/autosearch.py --model=llama-3-8b --num_tokens=1024

Steps (`--steps`, in this order):
  profile  times every op alone on this device, and GEMMs beside attention (the co-run table,
           `--corun_tokens`), `pipeline/profile.py`; writes the profile to `--profile`
           (default: the cache file `schedule="auto"` reads, under $NANOFLOW_JAX_CACHE or
           ~/.cache/nanoflow_jax); each point measured is kept in `<profile>.partial`, so a
           run stopped by a time limit resumes there when started again
  search   the two-stage MILP over nano-batch splits (`pipeline/autosearch.py`); writes the
           schedule JSON, with its prediction, to `--out` (`--schedule=PATH` runs it)
  measure  the device time of the decoder layers of one step (`--num_layers` of them) for
           sequential, the `--hand_written` schedule and the searched one, at the workload's
           shapes (`guard.layer_timer`: calls enqueued back to back), in a table beside their
           predictions with the error, and the guard's choice (`guard.choose`). Under tensor
           parallelism a whole engine step is timed instead (embedding, LM head and sampling
           included, the same for every schedule: compare the differences)

`--num_layers` runs the model with fewer layers (search and measure alike; the profile is per
layer): the pipelined schedules compile in a fraction of the time.
"""
import dataclasses
import gc
import json
import logging
import os
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoflow_jax.config import EngineConfig  # noqa: E402
from nanoflow_jax.model_loader import load_config  # noqa: E402
from nanoflow_jax.pipeline import autosearch  # noqa: E402
from nanoflow_jax.pipeline import profile as prof  # noqa: E402

flags.DEFINE_string("model", "tiny-llama", "preset name or checkpoint directory")
flags.DEFINE_string("dtype", "bfloat16", "weights, activations and KV cache dtype")
flags.DEFINE_integer("num_tokens", 1024, "the dense batch (tokens per step) to search for")
flags.DEFINE_integer("tensor_parallel_size", 1, "devices per model: the profile times one "
                     "shard's ops and the all-reduce over this many devices")
flags.DEFINE_list("steps", ["profile", "search", "measure"], "profile, search, measure")
flags.DEFINE_string("profile", "", "profile JSON (default: this device's cache file); "
                    "written by the profile step, read by search")
flags.DEFINE_string("out", "", "schedule JSON written by search, timed by measure "
                    "(default: next to the profile, <profile>.schedule.json)")
flags.DEFINE_integer("granularity", 0, "nano-batch sizes are multiples of this (0: 128 from "
                     "1024-token batches, finer below)")
flags.DEFINE_integer("token_step", 0, "profiled token counts are multiples of this (0: the "
                     "granularity; a coarser step profiles faster, the search interpolates)")
flags.DEFINE_list("shares", ["0.25", "0.5", "0.75", "1.0"], "SM shares profiled (1.0 needed)")
flags.DEFINE_list("contexts", ["512", "2048"], "decode contexts profiled")
flags.DEFINE_integer("calls", 10, "calls enqueued back to back per timing")
flags.DEFINE_integer("repeats", 5, "timings per op (the median is kept)")
flags.DEFINE_integer("page_size", 16, "KV page size")
flags.DEFINE_integer("num_decode", -1, "decode rows of the workload (-1: 300 per 1024 tokens)")
flags.DEFINE_integer("decode_context", 1300, "context of each decode row")
flags.DEFINE_list("num_nano", ["2", "3", "4"], "nano-batch counts searched")
flags.DEFINE_float("time_limit", 50.0, "seconds for the whole search (HiGHS keeps its best)")
flags.DEFINE_integer("max_splits", 16, "splits per count through stage 1")
flags.DEFINE_integer("keep", 2, "splits per count through stage 2")
flags.DEFINE_bool("streams", True, "GEMMs on stream 1, attention on stream 2")
flags.DEFINE_bool("concurrent", False, "XLA may run independent kernels at once (+graph)")
flags.DEFINE_list("corun_tokens", ["auto"], "row counts of the co-run table (GEMM beside "
                  "attention); auto: a quarter and half of the dense batch; empty: none")
flags.DEFINE_integer("corun_context", 0, "decode context of the co-run attention (0: the "
                     "workload's --decode_context)")
flags.DEFINE_integer("num_layers", 0, "decoder layers searched and measured (0: the model's)")
flags.DEFINE_string("hand_written", "nano2-pipe-nostreams", "the hand-written schedule "
                    "measured beside sequential and the searched one ('' : none)")
flags.DEFINE_float("min_gain", 0.02, "the searched schedule must predict (search) and "
                   "measure (guard) this fraction faster than sequential")
flags.DEFINE_integer("measure_repeats", 10, "steps enqueued back to back per timing")
flags.DEFINE_integer("measure_pages", 25000, "KV pages of the measuring engine (decodes "
                     "share pages round robin beyond)")
F = flags.FLAGS


def main(argv):
    del argv
    logging.getLogger("nanoflow_jax").setLevel(logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config = load_config(F.model)
    if F.num_layers:
        config = dataclasses.replace(config, num_layers=F.num_layers)
    t = F.num_tokens
    workload = autosearch.Workload(F.num_decode if F.num_decode >= 0 else t * 300 // 1024,
                                   F.decode_context)
    granularity = F.granularity or autosearch.granularity(t)
    step = F.token_step or granularity
    tp = F.tensor_parallel_size
    if tp < 1:
        raise app.UsageError(f"--tensor_parallel_size must be >= 1, got {tp}")
    if tp > 1 and F.num_layers and "measure" in F.steps:
        raise app.UsageError("--num_layers: the measure step runs the model's own layers "
                             "under tensor parallelism")
    path = F.profile or prof.cache_path(prof.profile_key(config, t, F.dtype, F.page_size, tp))
    out = F.out or path.removesuffix(".json") + ".schedule.json"
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {F.model} {F.dtype}, dense "
          f"batch {t}, {workload.num_decode} decodes @{workload.decode_context}")
    if "profile" in F.steps:
        corun = (autosearch.default_corun_tokens(t) if F.corun_tokens == ["auto"]
                 else tuple(int(n) for n in F.corun_tokens))
        profile = prof.profile_ops(config, t, F.dtype, token_step=step,
                                   shares=tuple(float(s) for s in F.shares),
                                   contexts=tuple(int(c) for c in F.contexts),
                                   page_size=F.page_size, calls=F.calls, repeats=F.repeats,
                                   tensor_parallel_size=tp, corun_tokens=corun,
                                   corun_context=F.corun_context or workload.decode_context,
                                   resume_path=path + ".partial", workload=workload)
        profile.save(path)
        print(f"profile: {path}")
    result = None
    if "search" in F.steps:
        options = autosearch.SearchOptions(
            num_nano=tuple(int(n) for n in F.num_nano), granularity=granularity,
            max_splits=F.max_splits, keep=F.keep, time_limit_s=F.time_limit,
            min_gain=F.min_gain, streams=F.streams, concurrent=F.concurrent)
        result = autosearch.search(prof.Profile.load(path), config.num_layers, workload,
                                   options)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(result.to_json())
        print(f"search: {result.solve_s:.1f} s; chose {result.schedule.name}: predicted "
              f"{result.predicted_step_ms:.3f} ms of layers per step, sequential "
              f"{result.sequential_step_ms:.3f} ms ({result.period_ms:.4f} vs "
              f"{result.sequential_period_ms:.4f} ms per layer); written to {out}")
        for sizes, first, second, penalised in result.candidates:
            print(f"  split {sizes}: stage 1 {first:.4f} ms/layer, stage 2 "
                  + ("-" if second is None else f"{second:.4f} ms/layer, "
                     f"{penalised:.4f} with the overlap penalty"))
    if "measure" in F.steps:
        compare(config, prof.Profile.load(path), out, workload)


def compare(config, profile, out: str, workload: autosearch.Workload) -> None:
    """The table of predicted and measured ms of the decoder layers per step, and the guard's
    choice between the searched schedule and sequential."""
    from nanoflow_jax.pipeline import guard, predict
    from nanoflow_jax.pipeline.spec import named_schedule

    t, layers = F.num_tokens, config.num_layers
    with open(out) as f:
        predicted = json.load(f)["prediction"]
    rows = [("sequential", "sequential", predicted["sequential_period_ms"] * layers)]
    if F.hand_written:
        hand = named_schedule(F.hand_written, t)
        rows.append(("hand-written", F.hand_written,
                     predict.schedule_ms(profile, hand, workload, layers)))
    searched = named_schedule(out, t)
    rows.append(("searched", searched.name, predicted["period_ms"] * layers))
    timer = (timer_for(config, workload) if F.tensor_parallel_size == 1 else
             lambda schedule: measure_step(config, schedule, workload))
    measured = {}
    for label, name, _ in rows:
        if label == "searched" and searched.is_sequential:
            measured[label] = measured["sequential"]  # the search chose sequential
            continue
        measured[label] = timer(searched if label == "searched" else named_schedule(name, t))
        print(f"measured {name}: {measured[label]:.3f} ms")
        gc.collect()
    what = "layers" if F.tensor_parallel_size == 1 else "layers; measured: whole step"
    print(f"\n{layers} layers, ms per step ({what})")
    print("schedule | predicted ms | measured ms | error %")
    for label, name, ms in rows:
        print(f"{label} ({name}) | {ms:.3f} | {measured[label]:.3f} | "
              f"{100 * (ms - measured[label]) / measured[label]:+.1f}")
    seq_ms, searched_ms = measured["sequential"], measured["searched"]
    kept = searched if searched.is_sequential else guard.choose(
        searched, rows[-1][2], rows[0][2],
        lambda s: seq_ms if s.is_sequential else searched_ms, F.min_gain).schedule
    print(f"predicted gain {rows[0][2] - rows[-1][2]:.3f} ms, measured gain "
          f"{seq_ms - searched_ms:.3f} ms; guard keeps {kept.name}")


def timer_for(config, workload: autosearch.Workload):
    """`guard.layer_timer` over every layer of `config` (random weights)."""
    from nanoflow_jax.pipeline import guard
    from nanoflow_jax.weights import random_params

    params = random_params(config, F.dtype)["layers"]
    return guard.layer_timer(params, config, workload, F.num_tokens, F.dtype, F.page_size,
                             layers=config.num_layers, steps=F.measure_repeats)


def measure_step(config, schedule, workload: autosearch.Workload) -> float:
    """Device ms per engine step of `schedule` on the workload's batch: D decodes, one prompt
    chunk (under tensor parallelism, where `guard.layer_timer` does not run)."""
    from nanoflow_jax.batch import SeqChunk, build_batch
    from nanoflow_jax.benchmarks.timing import device_ms_per_call
    from nanoflow_jax.engine.model_runner import ModelRunner
    from nanoflow_jax.engine.sampler import SampleMode, sampling_tensors
    from nanoflow_jax.sampling_params import SamplingParams

    t, nd, ctx = F.num_tokens, workload.num_decode, workload.decode_context
    runner = ModelRunner(EngineConfig(
        model=F.model, dtype=F.dtype, max_num_batched_tokens=t, max_num_seqs=max(nd, 1),
        min_bucket=t, page_size=F.page_size, num_pages=F.measure_pages,
        max_model_len=min(config.max_position_embeddings, max(ctx + 2, t)), schedule=schedule,
        tensor_parallel_size=F.tensor_parallel_size))
    page = F.page_size
    pages_per = -(-(ctx + 1) // page)
    rng = np.random.default_rng(0)
    decodes = [SeqChunk([int(rng.integers(config.vocab_size))], ctx,
                        [(i * pages_per + j) % runner.num_pages for j in range(pages_per)])
               for i in range(nd)]
    chunk = t - nd
    prefills = [SeqChunk(rng.integers(0, config.vocab_size, chunk).tolist(), 0,
                         list(range(-(-chunk // page))))] if chunk else []
    shape = runner.shape_for(t)
    batch = jax.device_put(build_batch(decodes, prefills, shape, page))
    params = [SamplingParams(temperature=0.0)] * shape.num_logits
    sampling = jax.device_put(sampling_tensors(params, [0] * shape.num_logits,
                                               [0] * shape.num_logits))
    mode = SampleMode.of(params)
    return device_ms_per_call(lambda: runner.run_step(batch, sampling, mode),
                              calls=F.measure_repeats, repeats=3)


if __name__ == "__main__":
    app.run(main)

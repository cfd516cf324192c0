"""The engine's own host work per step (EngineStats: schedule, build, process) at a large batch.

    PYTHONPATH=. python3 profiling/host_time.py                       # CPU, tiny model, ~1 min
    # decode-only at 1024 sequences on a GPU, streamed (--nostream: offline)
    PYTHONPATH=. python3 profiling/host_time.py --model=llama-3-8b --max_model_len=8192 \\
        --num_requests=1024 --max_num_seqs=1024 --max_num_batched_tokens=1024 \\
        --prompt_len=16 --max_tokens=512 --steps=200
    # the same host work on the CPU, without the model (the preset's ids over its tokenizer)
    PYTHONPATH=. python3 profiling/host_time.py --skip_device --fake_vocab=128256 \\
        --num_requests=1024 --max_num_seqs=1024 --prompt_len=16 --max_tokens=512 \\
        --max_model_len=1024 --steps=100

`--num_requests` requests of `--prompt_len` random tokens arrive at once, at most
`--max_num_seqs` running. The first steps (admitting and prefilling every request that fits)
are not timed unless `--warmup_steps` says how many to skip; then `--steps` steps are: with
as many requests as running sequences they are decode-only; with more, finished requests make
room for prefills (a mixed batch). `--stream` returns every request's text each step (the
server); else only finished requests (offline `LLM`). Prints the median and mean ms/step of
each host part: the scheduler, the batch build (and `build_batch` in it), the launch, the
processing of the previous step's tokens, their sum without the launch (`host`: the engine's
own host work, EngineStats.host_s), and the wait for the device; and how many sequences ran
in the timed steps (first, fewest, last), with a warning when some finished among them.
`--serial` (the default on the CPU, where the device's threads share the host's cores) blocks
on each step as it is launched. JSON goes to $OUT/host_time.json when OUT is set.

The ramp is long when the sequences fill the token budget: decodes go first, so prompts get
what the running decodes leave (budget B minus running), and admitting N prompts of P tokens
takes about P·(H(B) - H(B - N)) steps (H: harmonic numbers), 7.5·P for N = B = 1024: 960
steps at P = 128, 120 at P = 16. A sequence admitted early generates a token every step of
it, so `--max_tokens` must exceed the ramp plus `--steps` for the timed steps to hold all N,
and N·(P + max_tokens) tokens must fit the KV cache (admission reserves them): hence the
short prompts above.
"""
import cProfile
import functools
import json
import os
import pstats
import time

import jax
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine import llm_engine, model_runner
from nanoflow_jax.engine.sampler import SampleOutput
from nanoflow_jax.sampling_params import MAX_LOGPROBS, SamplingParams

flags.DEFINE_string("model", "tiny-llama", "preset or checkpoint")
flags.DEFINE_integer("num_requests", 1000, "requests, all arriving at the start")
flags.DEFINE_integer("prompt_len", 16, "prompt tokens per request")
flags.DEFINE_integer("max_tokens", 160, "output tokens per request")
flags.DEFINE_integer("max_num_seqs", 1024, "most running sequences")
flags.DEFINE_integer("max_num_batched_tokens", 1024, "the dense batch")
flags.DEFINE_integer("max_model_len", 512, "sets the page table's width (max_model_len / "
                     "page_size pages)")
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_integer("max_prefill_seqs", 16, "most prompt chunks per step")
flags.DEFINE_integer("num_pages", None, "KV pages (default: what the memory budget gives)")
flags.DEFINE_integer("steps", 60, "timed steps")
flags.DEFINE_integer("warmup_steps", -1, "steps before the timed ones (-1: until every "
                     "admitted request has been prefilled and the queue is empty or stuck)")
flags.DEFINE_bool("stream", True, "stream outputs (every request each step) as the server does")
flags.DEFINE_string("dtype", "auto", "weights and KV cache")
flags.DEFINE_bool("serial", None, "block on each step as it is launched, so the host parts "
                  "are timed without the device's threads competing for the same cores (default: "
                  "on the CPU backend, where the device is the host)")
flags.DEFINE_bool("skip_device", False, "replace the model step by random letters: the host "
                  "work alone, quickly (on the CPU the model step takes most of a second and "
                  "evicts the host's caches)")
flags.DEFINE_integer("fake_vocab", 0, "with --skip_device: sample ids uniformly from [0, N) as a "
                     "random-weight model does (128256: the llama-3-8b preset, whose byte "
                     "tokenizer decodes 259 of those ids and skips the rest); 0: random letters "
                     "(every token a character)")
flags.DEFINE_bool("split_launch", False, "in the timed steps, move the batch to the device "
                  "(jax.device_put, timed as launch_h2d) before the jitted calls (launch_call): "
                  "where the launch's host time goes")
flags.DEFINE_integer("cprofile", 0, "also print the N functions with the most cumulative time "
                     "in the timed steps (cProfile; it slows them)")
F = flags.FLAGS

PARTS = ("schedule", "build", "build_batch", "launch", "process", "host", "wait")


class _Timer:
    """Accumulates the time spent in a wrapped function."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def _snapshot(engine, timers: dict[str, _Timer]) -> dict:
    s = engine.stats
    return {"schedule": s.schedule_s, "build": s.build_s,
            **{name: t.seconds for name, t in timers.items()},
            "launch": s.launch_s, "process": s.process_s, "host": s.host_s, "wait": s.wait_s,
            "steps": s.steps, "generated": s.generated_tokens, "prompt": s.prompt_tokens,
            "running": len(engine.scheduler.running)}


def _random_tokens(rng, num_rows: int, vocab: int, batch, sampling, mode) -> SampleOutput:
    """What `ModelRunner.run_step` returns, without the model: a random id in [0, vocab) a
    row, or a random letter (vocab 0)."""
    del batch, sampling, mode
    low, high = (0, vocab) if vocab else (ord("a"), ord("z") + 1)
    return SampleOutput(
        token_ids=rng.integers(low, high, num_rows).astype(np.int32),
        logprob=np.zeros(num_rows, np.float32),
        top_ids=np.zeros((num_rows, MAX_LOGPROBS), np.int32),
        top_logprobs=np.zeros((num_rows, MAX_LOGPROBS), np.float32))


def _ramped(engine) -> bool:
    """Every admitted request is decoding, and nothing more can be admitted now."""
    sched = engine.scheduler
    prefilling = any(s.num_tokens - s.num_computed > 1 for s in sched.running)
    return not prefilling and (not sched.waiting or len(sched.running) >= sched.max_running)


def main(argv):
    del argv
    timer = _Timer(model_runner.build_batch)
    model_runner.build_batch = timer  # what dispatch calls; warm-up's calls are not counted
    engine = llm_engine.LLMEngine(EngineConfig(
        model=F.model, dtype=F.dtype, max_num_seqs=F.max_num_seqs,
        max_num_batched_tokens=F.max_num_batched_tokens, max_model_len=F.max_model_len,
        page_size=F.page_size, num_pages=F.num_pages, max_prefill_seqs=F.max_prefill_seqs,
        min_bucket=F.max_num_batched_tokens), stream_outputs=F.stream)
    timer.seconds = 0.0
    rng = np.random.default_rng(0)
    if F.skip_device:
        engine.runner.run_step = functools.partial(_random_tokens, rng, engine.runner.num_rows,
                                                   F.fake_vocab)
    vocab = min(engine.model_config.vocab_size, 256)  # byte tokens: any id decodes
    params = SamplingParams(temperature=0.0, max_tokens=F.max_tokens, ignore_eos=True)
    for i in range(F.num_requests):
        ids = rng.integers(0, vocab, F.prompt_len).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    warm = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests() and (
            warm < F.warmup_steps if F.warmup_steps >= 0 else not _ramped(engine)):
        engine.step()
        warm += 1
    ramp_s = time.perf_counter() - t0
    serial = (jax.default_backend() == "cpu" if F.serial is None else F.serial
              ) and not F.skip_device
    timers = {"build_batch": timer}
    if F.split_launch and not F.skip_device:
        mesh = engine.runner.mesh  # tensor parallel: the batch replicated over it
        where = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        timers["launch_h2d"] = h2d = _Timer(functools.partial(jax.device_put, device=where))
        timers["launch_call"] = call = _Timer(engine.runner.run_step)
        engine.runner.run_step = lambda batch, sampling, mode: call(*h2d((batch, sampling)), mode)
    parts = PARTS[:4] + tuple(k for k in timers if k.startswith("launch_")) + PARTS[4:]
    if serial:  # launches return once their step has run: the host parts see an idle device
        run_step = engine.runner.run_step
        engine.runner.run_step = lambda *args: jax.block_until_ready(run_step(*args))
    profiler = cProfile.Profile() if F.cprofile else None
    snapshots, outputs = [_snapshot(engine, timers)], 0
    t0 = time.perf_counter()
    for _ in range(F.steps):
        if not engine.has_unfinished_requests():
            break
        if profiler:
            profiler.enable()
        outputs += len(engine.step())
        if profiler:
            profiler.disable()
        snapshots.append(_snapshot(engine, timers))
    wall = time.perf_counter() - t0
    steps = max(len(snapshots) - 1, 1)
    deltas = {k: np.diff([s[k] for s in snapshots]) for k in snapshots[0]}
    result = {
        "flags": {k: getattr(F, k) for k in (
            "model", "num_requests", "prompt_len", "max_tokens", "max_num_seqs",
            "max_num_batched_tokens", "max_model_len", "page_size", "steps", "stream",
            "skip_device", "fake_vocab")},
        "serial": serial, "warmup_steps": warm, "ramp_s": ramp_s, "timed_steps": steps,
        "median_ms": {k: 1e3 * float(np.median(deltas[k])) for k in parts},
        "mean_ms": {k: 1e3 * float(np.mean(deltas[k])) for k in parts},
        "wall_ms_per_step": 1e3 * wall / steps, "outputs_per_step": outputs / steps,
        "decoded_per_step": float(np.mean(deltas["generated"])),
        "prompt_tokens_per_step": float(np.mean(deltas["prompt"])),
        "running": [int(snapshots[i]["running"]) for i in (0, -1)],
        "running_min": int(min(s["running"] for s in snapshots))}
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(F.cprofile)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "host_time.json"), "w") as f:
            json.dump(result, f, indent=1)
    note = (" (launch includes the device step)" if serial else
            (f" (no model step: random ids < {F.fake_vocab})" if F.fake_vocab else
             " (no model step: random letters)") if F.skip_device else "")
    print(f"{F.model}: {warm} warm-up steps ({ramp_s:.1f}s), {steps} timed steps "
          f"({result['wall_ms_per_step']:.0f} ms each); per step "
          f"{result['decoded_per_step']:.0f} tokens read, {result['prompt_tokens_per_step']:.0f} "
          f"prompt tokens, {result['outputs_per_step']:.0f} outputs; stream={F.stream}, "
          f"serial={serial}{note}")
    first, last = result["running"]
    print(f"running sequences: {first} at the first timed step, {result['running_min']} at the "
          f"fewest, {last} at the last")
    if first < min(F.num_requests, F.max_num_seqs):
        print(f"WARNING: {first} of {min(F.num_requests, F.max_num_seqs)} sequences ran at "
              f"the first timed step: the others finished in the ramp ({warm} steps, "
              f"--max_tokens={F.max_tokens}) or did not fit the KV cache (admission reserves "
              f"prompt + max_tokens tokens each; {engine.allocator.num_pages} pages of "
              f"{F.page_size})")
    if result["running_min"] < first:
        print(f"WARNING: {first - result['running_min']} of the {first} running sequences "
              f"finished in the timed steps (ramp {warm} steps, --max_tokens={F.max_tokens}): "
              f"raise --max_tokens above {warm + F.steps} or shorten the ramp (--prompt_len)")
    print("| ms/step | " + " | ".join(parts) + " |")
    print("|" + "---|" * (len(parts) + 1))
    for stat in ("median", "mean"):
        row = result[f"{stat}_ms"]
        print(f"| {stat} | " + " | ".join(f"{row[k]:.2f}" for k in parts) + " |")


if __name__ == "__main__":
    app.run(main)

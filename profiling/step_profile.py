"""Device time of one model step at the shapes of a decode-heavy dense batch (GPU).

    python3 profiling/step_profile.py --model=llama-3-8b

Builds batches directly (no scheduler): D decodes of context C plus prompt tokens up to T.
Prints the median time per step over repeats (each blocked on), the time per step and to
enqueue one when steps are issued back to back (the device time per step, as the engine runs
them), the share a GEMM-only roofline would take, and how many greedy tokens of the step
agree with the first schedule's (the same weights and batch) and the largest difference of
their log-probabilities (random weights give flat logits, so re-rounding alone flips a few
argmaxes: 255/256 tokens and 0.02 in one measured case; docs/overlap.md has what the stream
schedules gave). `--logprobs=0,20` adds rows whose requests ask for top logprobs.
`--power_s=S` also runs S seconds of steps back to back under `PowerSampler`: the sustained
time per step, the mean power and SM clock, and the energy per step (an H200 runs the step at
its power cap, so a schedule that overlaps more work runs at a lower clock).
"""
import os
import re
import time
import traceback

import jax
import numpy as np
from absl import app, flags

from trace_summary import format_summary, summarize_dir
from nanoflow_jax.batch import SeqChunk, build_batch
from nanoflow_jax.benchmarks.power import PowerSampler
from nanoflow_jax.benchmarks.timing import measure_peak_flops, sustained_ms_per_call
from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.model_runner import ModelRunner
from nanoflow_jax.engine.sampler import SampleMode, sampling_tensors
from nanoflow_jax.sampling_params import SamplingParams

flags.DEFINE_string("model", "llama-3-8b", "preset or checkpoint")
flags.DEFINE_integer("repeats", 20, "timed steps per case")
flags.DEFINE_multi_string("schedule", ["sequential"],
                          "nano-batch schedules to time (repeat the flag to compare several)")
flags.DEFINE_string("trace_dir", "", "also trace 2 steps per case with jax.profiler under this "
                    "folder and print the kernel overlap (profiling/trace_summary.py)")
flags.DEFINE_bool("mixed_only", False, "only the mixed case (compiles one bucket)")
flags.DEFINE_integer("mixed_tokens", 1024, "the mixed case's dense batch T (300 decodes of 1300 "
                     "tokens, the rest one prompt chunk); also the engine's token budget")
flags.DEFINE_list("logprobs", ["0"], "top logprobs each row asks for; one row of the table per "
                  "value (0: the sampler skips its [B, V] top-k)")
flags.DEFINE_float("power_s", 0.0, "seconds of back-to-back steps under the power sampler "
                   "(0: none)")
F = flags.FLAGS


def make_cases(mixed_tokens: int):
    """(name, tokens T, decodes, decode context, prompt chunk length) of each case."""
    t = mixed_tokens
    return [
        (f"mixed T={t}: 300 decodes @1300 + {t - 300} prefill", t, 300, 1300, t - 300),
        ("decode-only T=256: 256 decodes @1300", 256, 256, 1300, 0),
        (f"prefill-only T={t}: one {t}-token prompt", t, 0, 0, t),
    ]


def main(argv):
    del argv
    peak = measure_peak_flops()
    cases = make_cases(F.mixed_tokens)[:1 if F.mixed_only else None]
    rows = []
    for schedule in F.schedule:
        runner = None  # free the previous weights and KV cache before the next ones
        try:
            runner = ModelRunner(EngineConfig(
                model=F.model, max_num_batched_tokens=F.mixed_tokens, max_num_seqs=512,
                min_bucket=min(c[1] for c in cases),
                max_model_len=2048, num_pages=25000, schedule=schedule))
            runner.warmup()
            rows += profile(runner, peak, schedule, cases)
        except Exception as e:  # a schedule XLA rejects is a finding: report it, go on
            print(f"schedule {schedule} failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
    print(f"\npeak bf16 GEMM {peak / 1e12:.0f} TFLOP/s; {jax.devices()[0].device_kind}")
    print("schedule | case | T | step ms (median) | back-to-back ms/step | enqueue ms/step | "
          "2·P·T/peak ms | tokens = first schedule's, max |Δ logprob of the token| | "
          "sustained ms/step, W, SM MHz, J/step")
    for r in rows:
        print(_fmt(r))


def _fmt(r) -> str:
    return (f"{r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | "
            f"{r[7]} | {r[8]}")


FIRST = {}  # case -> the first schedule's (greedy tokens, their logprobs) of its first step


def profile(runner, peak, schedule, cases):
    cfg, page = runner.model_config, runner.config.page_size
    rng = np.random.default_rng(0)
    rows = []
    for case_name, t, nd, ctx, chunk in cases:
        pages_per = -(-(ctx + 1) // page)
        perm = rng.permutation(runner.num_pages)
        decodes = [SeqChunk([int(rng.integers(cfg.vocab_size))], ctx,
                            perm[i * pages_per:(i + 1) * pages_per].tolist()) for i in range(nd)]
        prefills = []
        if chunk:
            start = nd * pages_per
            prefills = [SeqChunk(rng.integers(0, cfg.vocab_size, chunk).tolist(), 0,
                                 perm[start:start + -(-chunk // page)].tolist())]
        shape = runner.shape_for(nd + chunk)
        batch = jax.device_put(build_batch(decodes, prefills, shape, page))
        for n in map(int, F.logprobs):
            name = case_name + (f", {n} top logprobs" if n else "")
            params = [SamplingParams(temperature=0.0, logprobs=n or None)] * shape.num_logits
            sampling = jax.device_put(sampling_tensors(params, [0] * shape.num_logits,
                                                       [0] * shape.num_logits))
            rows.append(_time_step(runner, peak, schedule, name, batch, sampling,
                                   SampleMode.of(params), shape, nd, chunk))
    return rows


def _time_step(runner, peak, schedule, name, batch, sampling, mode, shape, nd, chunk):
    """One row: the step's median time, back to back and enqueue times, agreement, a trace."""
    def step():
        return runner.run_step(batch, sampling, mode)

    sampled = list(range(nd)) + ([shape.num_decode] if chunk else [])
    out = step()
    tokens, top = (np.asarray(a)[sampled] for a in (out.token_ids, out.logprob))
    first_tokens, first_top = FIRST.setdefault(name, (tokens, top))
    agree = (f"{int((tokens == first_tokens).sum())}/{len(tokens)}, "
             f"{float(np.abs(top - first_top).max()):.1e}")
    for _ in range(3):
        jax.block_until_ready(step())
    times = []
    for _ in range(F.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    outs = [step() for _ in range(F.repeats)]  # back to back: how long does enqueueing take?
    enqueue = (time.perf_counter() - t0) / F.repeats
    jax.block_until_ready(outs)
    back_to_back = (time.perf_counter() - t0) / F.repeats
    gemm_ms = 2 * runner.model_config.active_param_count * shape.num_tokens / peak * 1e3
    power = "-"
    if F.power_s:
        n = max(1, round(F.power_s / back_to_back))
        with PowerSampler() as sampler:
            sustained = sustained_ms_per_call(step, calls=n) / 1e3
        if sampler.watts is not None:
            power = (f"{1e3 * sustained:.2f}, {sampler.watts:.0f}, {sampler.sm_mhz:.0f}, "
                     f"{sampler.watts * sustained:.1f}")
    row = (schedule, name, shape.num_tokens, 1e3 * float(np.median(times)),
           1e3 * back_to_back, 1e3 * enqueue, gemm_ms, agree, power)
    print("row: " + _fmt(row), flush=True)  # kept if a later schedule times out
    if F.trace_dir:
        folder = os.path.join(F.trace_dir, re.sub(r"\W", "_", f"{schedule}_{name}"))
        with jax.profiler.trace(folder):
            jax.block_until_ready([step() for _ in range(2)])
        print(f"trace: {schedule} | {name} | {format_summary(summarize_dir(folder, 2))}",
              flush=True)
    return row


if __name__ == "__main__":
    app.run(main)

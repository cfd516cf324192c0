"""Offline throughput: run a workload through `LLM` and report tokens/s and % of optimal.

    python scripts/benchmark_throughput.py                                    # tiny-llama
    python scripts/benchmark_throughput.py --model=llama-3-8b --workload=const:1024:512
        --num_requests=2048 --output_json=out.json
    python scripts/benchmark_throughput.py --model=llama-3-8b --workload=trace:lmsys
        --num_requests=512 --baseline=hf            # + HF transformers, same workload

Presets get random weights (same speed as real ones). Output lengths are exact (EOS ignored),
as in the NanoFlow paper. "% of optimal" = total tokens/s ÷ (peak bf16 FLOP/s ÷ 2·params),
the peak measured by a large GEMM in this process. Start-up (weights, KV cache, compilation)
is reported apart from the timed run.

`--baseline=hf` adds, for every workload, a second result with "schedule": "hf-transformers":
the same requests through HF transformers `generate` with static batches of
`--baseline_batch_size` (nanoflow_jax/benchmarks/hf_baseline.py; needs torch + transformers). It runs in
this process *before* our engine, while JAX has not yet taken its share of the GPU, and gives
its memory back when done; the results list ours first. `--baseline=hf-only` runs the baseline
alone (JAX never starts; "% of optimal" then uses a torch GEMM's peak).
"""
import dataclasses
import json
import time

from absl import app, flags

from nanoflow_jax import cli
from nanoflow_jax.benchmarks import workloads

cli.define_engine_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_multi_string("workload", ["const:64:32"],
                          "const:IN:OUT or trace:splitwise|lmsys|sharegpt (repeat: several "
                          "workloads, one start-up)")
flags.DEFINE_string("trace_dir", workloads.DEFAULT_TRACE_DIR, "directory of the trace CSVs")
flags.DEFINE_list("num_requests", ["32"], "requests in each timed run: one count for every "
                  "workload, or one per --workload in order")
flags.DEFINE_string("output_json", None, "write the results here")
flags.DEFINE_enum("baseline", "none", ["none", "hf", "hf-only"],
                  "hf: also run the HF transformers static-batching baseline on each workload; "
                  "hf-only: the baseline alone (its GEMM peak then measured with torch)")
flags.DEFINE_integer("baseline_batch_size", 64, "requests per static batch of the baseline",
                     lower_bound=1)
flags.DEFINE_string("baseline_dtype", None, "baseline dtype (default: bfloat16 on a GPU, "
                    "float32 on the CPU)")
flags.DEFINE_integer("baseline_num_requests", None, "the baseline runs the first N requests of "
                     "the workload (default: all of them)", lower_bound=1)
F = flags.FLAGS


def main(argv):
    del argv
    config = cli.engine_config()
    cli.setup(config)
    from nanoflow_jax import LLM
    from nanoflow_jax.benchmarks import timing

    # Before anything initialises JAX's GPU backend (which takes its memory share at once).
    baselines = run_hf_baseline() if F.baseline != "none" else []
    if F.baseline == "hf-only":
        from nanoflow_jax.benchmarks import hf_baseline
        from nanoflow_jax.model_loader import load_config

        peak = hf_baseline.measure_peak_flops()
        for base in baselines:
            base.pop("_max_model_len")
            _add_optimal(base, peak, load_config(F.model).param_count)
            base["peak_source"] = "torch GEMM"
        _report(baselines)
        return
    peak = timing.measure_peak_flops()
    t0 = time.perf_counter()
    llm = LLM(config=config)
    startup = time.perf_counter() - t0
    results = []
    for i, w in enumerate(F.workload):
        results.append(run_workload(llm, w, peak, startup))
        if baselines:
            base = baselines[i]
            expected_len = base.pop("_max_model_len")
            if llm.engine.runner.max_model_len != expected_len:
                raise AssertionError("the baseline ran a different workload (max_model_len "
                                     f"{expected_len} vs {llm.engine.runner.max_model_len})")
            _add_optimal(base, peak, llm.engine.model_config.param_count)
            results.append(base)
    _report(results)


def num_requests(workload: str) -> int:
    """--num_requests for `workload`: the only count, or the count in its position."""
    counts = [int(n) for n in F.num_requests]
    if len(counts) == 1:
        return counts[0]
    if len(counts) != len(F.workload):
        raise app.UsageError(f"--num_requests has {len(counts)} counts for "
                             f"{len(F.workload)} workloads: give one, or one per workload")
    return counts[F.workload.index(workload)]


def _add_optimal(base: dict, peak: float, param_count: int) -> None:
    from nanoflow_jax.benchmarks import timing

    optimal = timing.optimal_tokens_per_s(peak, param_count)
    base.update(peak_tflops=peak / 1e12, optimal_tokens_per_s=optimal,
                percent_of_optimal=100 * base["total_tokens_per_s"] / optimal)


def _report(results: list[dict]) -> None:
    if F.output_json:
        with open(F.output_json, "w") as f:
            json.dump(results, f, indent=2)
    keys = ["workload", "total_tokens_per_s", "output_tokens_per_s", "percent_of_optimal",
            "full_batch_percent_of_optimal", "step_ms", "host_ms_per_step", "num_requests"]
    if F.baseline != "none":
        keys.insert(1, "schedule")
    print("\n" + " | ".join(keys))
    for r in results:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float)
                         else "-" if r.get(k) is None else str(r[k]) for k in keys))


def run_hf_baseline() -> list[dict]:
    """The HF transformers baseline on every workload (one result each, in --workload order)."""
    from nanoflow_jax.benchmarks import hf_baseline as baseline_hf
    from nanoflow_jax.model_loader import load_config

    cfg = load_config(F.model)
    max_model_len = F.max_model_len or cfg.max_position_embeddings  # as the engine's runner
    t0 = time.perf_counter()
    hf_model, info = baseline_hf.load_hf_model(F.model, dtype=F.baseline_dtype,
                                               seed=F.seed)
    startup = time.perf_counter() - t0
    out = []
    for workload in F.workload:
        reqs = workloads.load_workload(workload, num_requests(workload), max_model_len, F.seed,
                                       F.trace_dir)
        prompts = workloads.prompt_token_ids(reqs, cfg.vocab_size, F.seed)
        if F.baseline_num_requests:
            reqs, prompts = reqs[:F.baseline_num_requests], prompts[:F.baseline_num_requests]
        run = baseline_hf.run_static_batches(hf_model, prompts, [r.output_len for r in reqs],
                                             F.baseline_batch_size, info["device"])
        elapsed = run["elapsed_s"]
        n_in = sum(r.prompt_len for r in reqs)
        n_out = sum(r.output_len for r in reqs)
        result = {
            "model": F.model, "workload": workload, "num_requests": len(reqs),
            "schedule": "hf-transformers",
            "device": info.get("device_name", info["device"]),
            "torch": info["torch"], "transformers": info["transformers"],
            "attn_implementation": info["attn_implementation"], "dtype": info["dtype"],
            "weights": info["source"], "batch_size": F.baseline_batch_size,
            "prompt_tokens": n_in, "output_tokens": n_out, "elapsed_s": elapsed,
            "total_tokens_per_s": (n_in + n_out) / elapsed,
            "output_tokens_per_s": n_out / elapsed,
            "requests_per_s": len(reqs) / elapsed,
            "peak_tflops": None, "optimal_tokens_per_s": None, "percent_of_optimal": None,
            "steps": run["steps"], "step_ms": 1e3 * elapsed / run["steps"],
            "host_ms_per_step": None, "batches": run["batches"],
            "padded_tokens": run["padded_tokens"],
            "batch_s": run["batch_s"],
            "startup_s": startup, "load_s": info["load_s"],
            "peak_memory_gib": baseline_hf.peak_memory_gib(info["device"]),
            "_max_model_len": max_model_len,
        }
        w = max(len(k) for k in result)
        for k, v in result.items():
            if k != "batch_s" and not k.startswith("_"):
                print(f"{k:<{w}}  {v:.4g}" if isinstance(v, float) else f"{k:<{w}}  {v}")
        out.append(result)
    del hf_model
    baseline_hf.free_device_memory()
    return out


def run_workload(llm, workload: str, peak: float, startup: float) -> dict:
    import jax

    from nanoflow_jax import SamplingParams
    from nanoflow_jax.benchmarks import timing

    eng, runner = llm.engine, llm.engine.runner
    cfg = eng.model_config
    reqs = workloads.load_workload(workload, num_requests(workload), runner.max_model_len, F.seed,
                                   F.trace_dir)
    prompts = [{"prompt_token_ids": ids}
               for ids in workloads.prompt_token_ids(reqs, cfg.vocab_size, F.seed)]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in reqs]

    stats0 = dataclasses.replace(eng.stats)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    steps = max(eng.stats.steps - stats0.steps, 1)

    def per_step_ms(name):
        return 1e3 * (getattr(eng.stats, name) - getattr(stats0, name)) / steps

    n_in = sum(r.prompt_len for r in reqs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if n_out != sum(r.output_len for r in reqs):
        raise AssertionError("output lengths differ from the workload's")
    optimal = timing.optimal_tokens_per_s(peak, cfg.param_count)
    total_tps = (n_in + n_out) / elapsed
    full_steps = eng.stats.full_steps - stats0.full_steps
    full_s = eng.stats.full_s - stats0.full_s
    # Steady state: the iterations with a full dense batch (no ramp-up, no decode-only tail).
    full_tps = (eng.stats.full_tokens - stats0.full_tokens) / full_s if full_s else None
    result = {
        "model": F.model, "workload": workload, "num_requests": len(reqs),
        "schedule": runner.schedule.name, "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "dense_batch": eng.config.max_num_batched_tokens,
        "max_num_seqs": eng.config.max_num_seqs,
        "prompt_tokens": n_in, "output_tokens": n_out, "elapsed_s": elapsed,
        "total_tokens_per_s": total_tps, "output_tokens_per_s": n_out / elapsed,
        "requests_per_s": len(reqs) / elapsed,
        "peak_tflops": peak / 1e12, "optimal_tokens_per_s": optimal,
        "percent_of_optimal": 100 * total_tps / optimal,
        "steps": steps, "step_ms": 1e3 * elapsed / steps,
        "full_batch_steps": full_steps,
        "full_batch_step_ms": 1e3 * full_s / full_steps if full_steps else None,
        "full_batch_tokens_per_s": full_tps,
        "full_batch_percent_of_optimal": 100 * full_tps / optimal if full_tps else None,
        "host_ms_per_step": per_step_ms("host_s"),
        "host_share_of_step": per_step_ms("host_s") / (1e3 * elapsed / steps),
        "schedule_ms_per_step": per_step_ms("schedule_s"),
        "build_ms_per_step": per_step_ms("build_s"),
        "process_ms_per_step": per_step_ms("process_s"),
        "launch_ms_per_step": per_step_ms("launch_s"),
        "wait_ms_per_step": per_step_ms("wait_s"),
        "preemptions": eng.stats.preemptions - stats0.preemptions,
        "startup_s": startup, "load_s": runner.load_time, "kv_alloc_s": runner.kv_time,
        "compile_s": runner.compile_time, "kv_pages": runner.num_pages,
        "peak_memory_gib": (timing.peak_memory_bytes() or 0) / 2**30,
    }
    w = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{w}}  {v:.4g}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    return result


if __name__ == "__main__":
    cli.run(main)

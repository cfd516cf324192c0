"""Offline throughput: run a workload through `LLM` and report tokens/s and % of optimal.

    python scripts/benchmark_throughput.py                                    # tiny, CPU
    python scripts/benchmark_throughput.py --model=llama-3-8b --workload=const:1024:512 \
        --num_requests=512 --output_json=out.json

Presets get random weights (same speed as real ones). Output lengths are exact (EOS ignored),
as in the NanoFlow paper. "% of optimal" = total tokens/s ÷ (peak bf16 FLOP/s ÷ 2·params),
the peak measured by a large GEMM in this process. Start-up (weights, KV cache, compilation)
is reported apart from the timed run.
"""
import json
import os
import time

from absl import app, flags

flags.DEFINE_string("model", "tiny-llama", "checkpoint directory or preset (random weights)")
flags.DEFINE_string("workload", "const:64:32", "const:IN:OUT or trace:splitwise|lmsys|sharegpt")
flags.DEFINE_string("trace_dir", None, "directory of the trace CSVs (default ../shared/workloads)")
flags.DEFINE_integer("num_requests", 32, "requests in the timed run")
flags.DEFINE_integer("seed", 0, "workload and weights seed")
flags.DEFINE_string("dtype", "bfloat16", "weights and KV dtype")
flags.DEFINE_integer("max_num_batched_tokens", 1024, "dense batch: tokens per iteration")
flags.DEFINE_integer("max_num_seqs", 256, "running sequences")
flags.DEFINE_integer("max_prefill_seqs", 16, "prompt chunks per iteration")
flags.DEFINE_integer("page_size", 16, "KV page size")
flags.DEFINE_integer("num_pages", None, "KV pages (default: from free memory)")
flags.DEFINE_integer("max_model_len", 2048, "prompt + output tokens per sequence")
flags.DEFINE_float("gpu_memory_utilization", 0.9, "device memory share for the engine")
flags.DEFINE_string("attention_impl", "auto", "pallas | reference | auto")
flags.DEFINE_string("output_json", None, "write the results here")
F = flags.FLAGS


def main(argv):
    del argv
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(F.gpu_memory_utilization))
    import jax

    from nanoflow_jax import LLM, SamplingParams, bench

    peak = bench.measure_peak_flops()
    t0 = time.perf_counter()
    llm = LLM(F.model, dtype=F.dtype, seed=F.seed, max_num_batched_tokens=F.max_num_batched_tokens,
              max_num_seqs=F.max_num_seqs, max_prefill_seqs=F.max_prefill_seqs,
              page_size=F.page_size, num_pages=F.num_pages, max_model_len=F.max_model_len,
              gpu_memory_utilization=1.0, attention_impl=F.attention_impl)
    startup = time.perf_counter() - t0
    eng, runner = llm.engine, llm.engine.runner
    cfg = eng.model_config
    trace_dir = F.trace_dir or bench.DEFAULT_TRACE_DIR
    reqs = bench.load_workload(F.workload, F.num_requests, runner.max_model_len, F.seed, trace_dir)
    prompts = [{"prompt_token_ids": ids}
               for ids in bench.prompt_token_ids(reqs, cfg.vocab_size, F.seed)]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in reqs]

    stats0 = dict(vars(eng.stats))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    steps = eng.stats.steps - stats0["steps"]
    host = eng.stats.host_s - stats0["host_s"]
    n_in = sum(r.prompt_len for r in reqs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if n_out != sum(r.output_len for r in reqs):
        raise AssertionError("output lengths differ from the workload's")
    optimal = bench.optimal_tokens_per_s(peak, cfg.param_count)
    total_tps = (n_in + n_out) / elapsed
    result = {
        "model": F.model, "workload": F.workload, "num_requests": len(reqs),
        "schedule": "sequential", "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "dense_batch": F.max_num_batched_tokens,
        "prompt_tokens": n_in, "output_tokens": n_out, "elapsed_s": elapsed,
        "total_tokens_per_s": total_tps, "output_tokens_per_s": n_out / elapsed,
        "requests_per_s": len(reqs) / elapsed,
        "peak_tflops": peak / 1e12, "optimal_tokens_per_s": optimal,
        "percent_of_optimal": 100 * total_tps / optimal,
        "steps": steps, "step_ms": 1e3 * elapsed / max(steps, 1),
        "host_ms_per_step": 1e3 * host / max(steps, 1),
        "host_share_of_step": host / elapsed,
        "preemptions": eng.stats.preemptions - stats0["preemptions"],
        "startup_s": startup, "load_s": runner.load_time, "kv_alloc_s": runner.kv_time,
        "compile_s": runner.compile_time, "kv_pages": runner.num_pages,
        "peak_memory_gib": (bench.peak_memory_bytes() or 0) / 2**30,
    }
    if F.output_json:
        with open(F.output_json, "w") as f:
            json.dump(result, f, indent=2)
    w = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{w}}  {v:.4g}" if isinstance(v, float) else f"{k:<{w}}  {v}")


if __name__ == "__main__":
    app.run(main)

"""Start the engine with a memory budget, fill every decode row, and compare the device's peak
memory with the plan (weights + largest workspace + step buffers + margin + KV cache).

    PYTHONPATH=. python3 scripts/memory_check.py                              # tiny, CPU
    PYTHONPATH=. python3 scripts/memory_check.py --model=llama-3-8b \
        --gpu_memory_utilization=0.95 --max_num_seqs=1024 --max_num_batched_tokens=1024

One configuration per process (XLA's pool is sized once, when JAX starts). Prints the start-up
log and one JSON line: the plan, the device's peak bytes in use (GPU) and the run's counts.
A configuration that cannot fit prints the engine's one-line error and exits with status 2.
"""
import json
import logging
import time

from absl import app, flags

flags.DEFINE_string("model", "tiny-llama", "checkpoint directory or preset (random weights)")
flags.DEFINE_float("gpu_memory_utilization", 0.9, "fraction of the device for the engine")
flags.DEFINE_string("max_num_seqs", "none", "most running sequences, or none (KV capacity)")
flags.DEFINE_integer("max_num_batched_tokens", 1024, "dense batch: tokens per iteration")
flags.DEFINE_integer("max_model_len", 2048, "prompt + output tokens per sequence")
flags.DEFINE_string("dtype", "bfloat16", "weights and KV dtype")
flags.DEFINE_integer("min_bucket", 16, "smallest compiled token count")
flags.DEFINE_integer("prompt_len", 128, "tokens per prompt")
flags.DEFINE_integer("output_len", 64, "tokens generated per request (EOS ignored)")
flags.DEFINE_integer("num_requests", None, "requests (default: twice the running cap, at least "
                     "8)")
F = flags.FLAGS


def main(argv):
    del argv
    from nanoflow_jax.device_memory import reserve_device_memory
    reserve_device_memory(F.gpu_memory_utilization)  # before JAX starts its backend

    import jax
    import numpy as np

    from nanoflow_jax import EngineConfig, LLMEngine, SamplingParams
    from nanoflow_jax.device_memory import device_memory, memory_stats

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    max_num_seqs = None if F.max_num_seqs.lower() == "none" else int(F.max_num_seqs)
    config = EngineConfig(model=F.model, dtype=F.dtype, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=F.max_num_batched_tokens,
                          max_model_len=F.max_model_len, min_bucket=F.min_bucket,
                          gpu_memory_utilization=F.gpu_memory_utilization)
    t0 = time.perf_counter()
    try:
        engine = LLMEngine(config)
    except ValueError as e:
        print(f"does not fit: {e}")
        raise SystemExit(2) from None
    start_s = time.perf_counter() - t0
    runner, plan = engine.runner, engine.runner.memory_plan
    num_requests = F.num_requests or max(8, 2 * runner.max_num_seqs)
    rng = np.random.default_rng(0)
    vocab = runner.model_config.vocab_size
    params = SamplingParams(max_tokens=F.output_len, ignore_eos=True, temperature=1.0, top_p=0.9)
    for i in range(num_requests):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(0, vocab, F.prompt_len)
                                    .tolist()}, params)
    t0, most_running, finished = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
        most_running = max(most_running, len(engine.scheduler.running))
    run_s = time.perf_counter() - t0
    stats = memory_stats(jax.local_devices()[0]) or {}
    memory = device_memory()
    result = {
        "model": F.model, "gpu_memory_utilization": F.gpu_memory_utilization,
        "max_num_seqs": max_num_seqs, "running_cap": runner.max_num_seqs,
        "decode_rows": runner.max_decode, "num_pages": runner.num_pages,
        "budget": plan.budget, "device_total": plan.total,
        "pool": None if memory is None else memory.pool, "weights": plan.weights,
        "workspace": plan.workspace, "workspace_program": plan.workspace_program,
        "step_buffers": plan.live, "margin": plan.margin, "kv_cache": plan.kv_bytes,
        "unplanned": plan.unplanned, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "peak_within_budget": (None if plan.budget is None or "peak_bytes_in_use" not in stats
                               else stats["peak_bytes_in_use"] <= plan.budget),
        "start_s": round(start_s, 1), "compile_s": round(runner.compile_time, 1),
        "requests": num_requests, "finished": finished, "most_running": most_running,
        "preemptions": engine.stats.preemptions, "run_s": round(run_s, 2),
        "tokens_per_s": round(num_requests * (F.prompt_len + F.output_len) / run_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)

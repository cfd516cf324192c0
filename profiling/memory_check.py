"""Start the engine with a memory budget, fill every decode row, and compare the device's peak
memory with the plan (weights + largest workspace + step buffers + margin + KV cache).

    python3 profiling/memory_check.py                              # tiny, CPU
    python3 profiling/memory_check.py --model=llama-3-8b \
        --gpu_memory_utilization=0.95 --max_num_seqs=1024 --max_num_batched_tokens=1024

The engine flags are EngineConfig's. One configuration per process (XLA's pool is sized once,
when JAX starts). Prints the start-up log and one JSON line: the plan, the device's peak bytes
in use (GPU) and the run's counts. A configuration that cannot fit prints the engine's one-line
error and exits with status 2.
"""
import json
import logging
import time

from absl import flags

from nanoflow_jax import cli

cli.define_engine_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_integer("prompt_len", 128, "tokens per prompt", lower_bound=1)
flags.DEFINE_integer("output_len", 64, "tokens generated per request (EOS ignored)",
                     lower_bound=1)
flags.DEFINE_integer("num_requests", None, "requests (default: twice the running cap, at "
                     "least 8)", lower_bound=1)
F = flags.FLAGS


def main(argv):
    del argv
    config = cli.engine_config()
    cli.setup(config)  # the device memory share, before JAX starts its backend
    import jax
    import numpy as np

    from nanoflow_jax import LLMEngine, SamplingParams
    from nanoflow_jax.device_memory import device_memory, memory_stats

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
    prompt_len = min(F.prompt_len, runner.max_model_len - F.output_len)
    for i in range(num_requests):
        ids = rng.integers(0, vocab, prompt_len).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    t0, most_running, finished = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
        most_running = max(most_running, len(engine.scheduler.running))
    run_s = time.perf_counter() - t0
    stats = memory_stats(jax.local_devices()[0]) or {}
    memory = device_memory()
    peak = stats.get("peak_bytes_in_use")
    result = {
        "model": config.model, "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_num_seqs": config.max_num_seqs, "running_cap": runner.max_num_seqs,
        "decode_rows": runner.max_decode, "num_pages": runner.num_pages,
        "device_total": plan.total, "pool": None if memory is None else memory.pool,
        "budget": plan.budget, "weights": plan.weights, "workspace": plan.workspace,
        "workspace_program": plan.workspace_program, "step_buffers": plan.live,
        "margin": plan.margin, "kv_cache": plan.kv_bytes, "unplanned": plan.unplanned,
        "peak_bytes_in_use": peak,
        "peak_within_budget": None if plan.budget is None or peak is None else
        peak <= plan.budget,
        "start_s": round(start_s, 1), "compile_s": round(runner.compile_time, 1),
        "requests": num_requests, "finished": finished, "most_running": most_running,
        "preemptions": engine.stats.preemptions, "run_s": round(run_s, 2),
        "tokens_per_s": round(num_requests * (prompt_len + F.output_len) / run_s, 1),
    }
    logging.info("memory check done")
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)

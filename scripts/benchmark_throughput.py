"""Offline throughput: run a workload through `LLM` and report tokens/s and % of optimal.

    python scripts/benchmark_throughput.py                                    # tiny-llama
    python scripts/benchmark_throughput.py --model=llama-3-8b --workload=const:1024:512
        --num_requests=2048 --output_json=out.json
    python scripts/benchmark_throughput.py --model=llama-3-8b --workload=trace:lmsys
        --num_requests=512 --baseline=hf-static,hf-cb   # + HF transformers, same workload

Presets get random weights (same speed as real ones). Output lengths are exact (EOS ignored),
as in the NanoFlow paper. "% of optimal" = total tokens/s ÷ (peak bf16 FLOP/s ÷ 2·params),
the peak measured by a large GEMM in this process and params the active ones (a
mixture-of-experts model counts the experts a token goes through). Start-up is reported apart
from the timed run: in all, and as weights, memory probes, compile, KV cache allocation and
warm-up.

`--baseline=hf-static,hf-cb` adds, for every workload, a result per HF transformers peer on the
same requests (nanoflow_jax/benchmarks/hf_baseline.py; needs torch + transformers):
"schedule": "hf-transformers-static" (`generate`, static batches of `--baseline_batch_size`;
`--baseline=hf` is this one) and "hf-transformers-cb" (transformers' continuous batching over a
paged KV cache, the engine of `generate_batch`). They run in this process *before* our engine,
while JAX has not yet taken its share of the GPU, and give their memory back when done; each
workload lists ours first. `--baseline_only` (or `--baseline=hf-only`) runs the peers alone (JAX
never starts; "% of optimal" then uses a torch GEMM's peak). A peer that fails gives a row with
"peer_error" instead of a throughput.
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
flags.DEFINE_list("baseline", ["none"],
                  "HF transformers peers run on each workload before our engine, comma-separated: "
                  "hf-static (or hf): static batches of generate; hf-cb: transformers' continuous "
                  "batching with a paged KV cache; none. hf-only: hf-static with --baseline_only")
flags.DEFINE_bool("baseline_only", False, "run the peers alone (JAX never starts; their GEMM "
                  "peak is then measured with torch)")
flags.DEFINE_integer("baseline_batch_size", 64, "hf-static: requests per static batch",
                     lower_bound=1)
flags.DEFINE_integer("baseline_max_batch_tokens", None, "hf-cb: most tokens in one forward pass "
                     "(default: transformers' choice)", lower_bound=1)
flags.DEFINE_integer("baseline_num_blocks", None, "hf-cb: KV cache blocks of "
                     "--baseline_page_size tokens (default: transformers' sizing from free GPU "
                     "memory; on the CPU, enough for the whole workload)", lower_bound=1)
flags.DEFINE_integer("baseline_page_size", None, "hf-cb: tokens per KV cache block (default: "
                     "transformers', 256)", lower_bound=4)
flags.DEFINE_integer("baseline_cb_max_requests", None, "hf-cb: most requests in one forward "
                     "pass (default: transformers', min(requests, 1024))", lower_bound=1)
flags.DEFINE_enum("baseline_cb_attn", "auto", ["auto", "sdpa", "eager"],
                  "hf-cb attention: auto is transformers' choice (flash attention when installed, "
                  "else SDPA over the paged cache)")
flags.DEFINE_enum("baseline_cb_cuda_graph", "auto", ["auto", "on", "off"],
                  "hf-cb CUDA graphs: auto is transformers' choice (on only for flash attention)")
flags.DEFINE_float("baseline_timeout_s", None, "a peer's timed run still going after this many "
                   "seconds stops, and its row gets a peer_error (the other results are kept)")
flags.DEFINE_string("baseline_dtype", None, "peers' dtype (default: bfloat16 on a GPU, "
                    "float32 on the CPU)")
flags.DEFINE_integer("baseline_num_requests", None, "the peers run the first N requests of "
                     "the workload (default: all of them)", lower_bound=1)


def _check_baseline(names):
    from nanoflow_jax.benchmarks import hf_baseline

    try:
        hf_baseline.parse_peers(names)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


flags.register_validator("baseline", _check_baseline)
F = flags.FLAGS


def main(argv):
    del argv
    config = cli.engine_config()
    cli.setup(config)
    from nanoflow_jax import LLM
    from nanoflow_jax.benchmarks import timing

    # Before anything initialises JAX's GPU backend (which takes its memory share at once).
    peers, alone = _peers()
    baselines = run_hf_baseline(peers) if peers else []
    if alone:
        from nanoflow_jax.benchmarks import hf_baseline
        from nanoflow_jax.model_loader import load_config

        peak = hf_baseline.measure_peak_flops()
        param_count = load_config(F.model).active_param_count
        for base in baselines:
            del base["_max_model_len"], base["_index"]
            hf_baseline.add_optimal(base, peak, param_count)
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
        for base in [b for b in baselines if b.get("_index") == i]:
            _add_baseline(base, llm, peak)
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


def _report(results: list[dict]) -> None:
    if F.output_json:
        with open(F.output_json, "w") as f:
            json.dump(results, f, indent=2)
    keys = ["workload", "total_tokens_per_s", "output_tokens_per_s", "percent_of_optimal",
            "full_batch_percent_of_optimal", "step_ms", "host_ms_per_step", "num_requests"]
    if any("peer" in r for r in results):
        keys.insert(1, "schedule")
    if any(r.get("peer_error") for r in results):
        keys.append("peer_error")
    print("\n" + " | ".join(keys))
    for r in results:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float)
                         else "-" if r.get(k) is None else str(r[k]) for k in keys))


def _peers() -> tuple[tuple[str, ...], bool]:
    from nanoflow_jax.benchmarks import hf_baseline

    peers, alone = hf_baseline.parse_peers(F.baseline)
    if (alone or F.baseline_only) and not peers:
        raise ValueError("--baseline_only needs peers in --baseline")
    return peers, alone or F.baseline_only


def run_hf_baseline(peers: tuple[str, ...]) -> list[dict]:
    """The HF transformers peers on every workload: rows in (workload, peer) order, each with
    "_index" (its workload's place in --workload) and "_max_model_len" for the checks."""
    from nanoflow_jax.benchmarks import hf_baseline
    from nanoflow_jax.model_loader import load_config

    cfg = load_config(F.model)
    max_model_len = F.max_model_len or cfg.max_position_embeddings  # as the engine's runner
    jobs = []
    for workload in F.workload:
        reqs = workloads.load_workload(workload, num_requests(workload), max_model_len, F.seed,
                                       F.trace_dir)
        prompts = workloads.prompt_token_ids(reqs, cfg.vocab_size, F.seed)
        n = F.baseline_num_requests or len(reqs)
        jobs.append((workload, reqs[:n], prompts[:n]))
    settings = hf_baseline.PeerSettings(
        batch_size=F.baseline_batch_size, max_batch_tokens=F.baseline_max_batch_tokens,
        num_blocks=F.baseline_num_blocks, page_size=F.baseline_page_size,
        max_requests=F.baseline_cb_max_requests,
        cb_attn=F.baseline_cb_attn, cb_cuda_graph=F.baseline_cb_cuda_graph,
        timeout_s=F.baseline_timeout_s)
    rows = hf_baseline.run_peers(F.model, peers, jobs, settings, dtype=F.baseline_dtype,
                                 seed=F.seed)
    for k, row in enumerate(rows):
        w = max(len(key) for key in row)
        for key, v in row.items():
            if key != "batch_s":
                print(f"{key:<{w}}  {v:.4g}" if isinstance(v, float) else f"{key:<{w}}  {v}")
        row.update(_index=k // len(peers), _max_model_len=max_model_len)
    return rows


def _add_baseline(base: dict, llm, peak: float) -> None:
    from nanoflow_jax.benchmarks import hf_baseline

    del base["_index"]
    if llm.engine.runner.max_model_len != base.pop("_max_model_len"):
        raise AssertionError("the peers ran a different workload (max_model_len differs)")
    hf_baseline.add_optimal(base, peak, llm.engine.model_config.active_param_count)


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
    optimal = timing.optimal_tokens_per_s(peak, cfg.active_param_count)
    total_tps = (n_in + n_out) / elapsed
    full_steps = eng.stats.full_steps - stats0.full_steps
    full_s = eng.stats.full_s - stats0.full_s
    # Steady state: the iterations with a full dense batch (no ramp-up, no decode-only tail).
    full_tps = (eng.stats.full_tokens - stats0.full_tokens) / full_s if full_s else None
    result = {
        "model": F.model, "workload": workload, "num_requests": len(reqs),
        "schedule": runner.schedule.name, "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "dense_batch": eng.config.max_num_batched_tokens,
        "max_num_seqs": runner.max_num_seqs,
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
        # Start-up: LLM(...) in all, then the runner's parts (ModelRunner.startup_line).
        "startup_s": startup, "load_s": runner.load_time,
        "memory_probe_s": runner.probe_time, "compile_s": runner.compile_time,
        "kv_alloc_s": runner.kv_time, "warmup_s": runner.warmup_time,
        "replans": runner.replans, "kv_pages": runner.num_pages,
        "peak_memory_gib": (timing.peak_memory_bytes() or 0) / 2**30,
    }
    w = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{w}}  {v:.4g}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    return result


if __name__ == "__main__":
    cli.run(main)

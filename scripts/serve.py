"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

    python scripts/serve.py                        # tiny-llama (random weights) on the CPU
    python scripts/serve.py --model=/path/to/Meta-Llama-3-8B-Instruct --port=8000 \
        --served_model_name=llama-3-8b-instruct --api_key=sk-local

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus). SIGTERM drains: new requests get 503,
running ones get up to --drain_timeout_s to finish, then the rest are aborted.

Engine knobs left unset get a value that suits the platform: small ones on the CPU (a dense
batch of 64 tokens, max_model_len=512, float32) so the default model starts in seconds, the
engine's defaults on a GPU (1024-token dense batch, the model's context, bfloat16).
"""
import logging
import os
import time

from absl import app, flags

flags.DEFINE_string("model", "tiny-llama", "checkpoint directory or preset name")
flags.DEFINE_string("served_model_name", None, "the model name of the API (default: --model)")
flags.DEFINE_string("dtype", None, "float32 | bfloat16 | float16 (default: float32 on the "
                    "CPU, bfloat16 on a GPU)")
flags.DEFINE_integer("max_num_batched_tokens", None, "dense batch: tokens per iteration "
                     "(default: 64 on the CPU, 1024 on a GPU)", lower_bound=1)
flags.DEFINE_integer("max_num_seqs", None, "most running sequences (default: 64 on the CPU, "
                     "256 on a GPU)", lower_bound=1)
flags.DEFINE_integer("max_prefill_seqs", 16, "most prompt chunks per iteration", lower_bound=1)
flags.DEFINE_integer("max_model_len", None, "prompt + output tokens per sequence (default: 512 "
                     "on the CPU, the model's context on a GPU)", lower_bound=1)
flags.DEFINE_integer("page_size", 16, "tokens per KV page (a power of two)", lower_bound=1)
flags.DEFINE_integer("num_pages", None, "KV pages (default: sized from free device memory)",
                     lower_bound=1)
flags.DEFINE_float("gpu_memory_utilization", 0.9, "fraction of device memory for weights + KV "
                   "+ activations (sets XLA_PYTHON_CLIENT_MEM_FRACTION)")
flags.DEFINE_integer("min_bucket", 16, "smallest compiled token count (fewer buckets: faster "
                     "start-up, more padding on small batches)", lower_bound=1)
flags.DEFINE_string("schedule", "sequential", "layer schedule: sequential, nanoN, "
                    "nanoN-nooverlap, nanoN-pipe[-nostreams][-smP], optionally +graph, or a "
                    "schedule JSON file (docs/overlap.md)")
flags.DEFINE_integer("seed", 0, "random weights of presets, and requests that give no seed")
flags.DEFINE_string("attention_impl", "auto", "pallas | reference | interpret | auto")
flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0: every interface)")
flags.DEFINE_integer("port", 8000, "port to listen on", lower_bound=0)
flags.DEFINE_string("api_key", None, "if set, /v1/* needs 'Authorization: Bearer <key>'")
flags.DEFINE_integer("max_queue", 256, "most requests waiting for a sequence slot (beyond "
                     "what the free slots of --max_num_seqs take); more get 503 + Retry-After",
                     lower_bound=1)
flags.DEFINE_integer("max_request_bytes", 16 * 1024 * 1024, "largest request body in bytes; "
                     "larger ones get 413", lower_bound=1)
flags.DEFINE_float("drain_timeout_s", 30.0, "on SIGTERM, how long running requests may finish "
                   "before they are aborted", lower_bound=0.0)
flags.DEFINE_string("log_level", "info", "debug | info | warning | error")
flags.DEFINE_bool("access_log", True, "log every HTTP request")
F = flags.FLAGS


def main(argv):
    del argv
    if not 0 < F.gpu_memory_utilization <= 1:
        raise app.UsageError("--gpu_memory_utilization must be in (0, 1]")
    # Before jax is imported: XLA's allocator takes this fraction of the GPU at start-up.
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{F.gpu_memory_utilization:g}"
    logging.basicConfig(level=F.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nanoflow_jax").setLevel(F.log_level.upper())

    import jax

    from nanoflow_jax.config import EngineConfig
    from nanoflow_jax.engine.llm_engine import LLMEngine
    from nanoflow_jax.server import AsyncEngine, ServerMetrics, create_app, run_server

    on_cpu = jax.default_backend() == "cpu"

    def pick(value, cpu, gpu):
        return value if value is not None else (cpu if on_cpu else gpu)

    config = EngineConfig(
        model=F.model,
        dtype=pick(F.dtype, "float32", "bfloat16"),
        seed=F.seed,
        max_num_batched_tokens=pick(F.max_num_batched_tokens, 64, 1024),
        max_num_seqs=pick(F.max_num_seqs, 64, 256),
        max_prefill_seqs=F.max_prefill_seqs,
        page_size=F.page_size,
        # The XLA allocator's limit already is this fraction of the device: the engine must
        # not take the fraction a second time when it sizes the KV cache.
        gpu_memory_utilization=1.0,
        max_model_len=pick(F.max_model_len, 512, None),
        num_pages=F.num_pages,
        attention_impl=F.attention_impl,
        min_bucket=F.min_bucket,
        schedule=F.schedule,
    )
    name = F.served_model_name or F.model
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    logging.info("engine ready in %.1fs: %s on %s, max_model_len=%d, %d KV pages of %d tokens",
                 time.perf_counter() - t0, F.model, jax.default_backend(), engine.max_model_len,
                 engine.allocator.num_pages, config.page_size)
    async_engine = AsyncEngine(engine, max_queue=F.max_queue, metrics=ServerMetrics(name))
    fastapi_app = create_app(async_engine, name, api_key=F.api_key,
                             max_request_bytes=F.max_request_bytes)
    run_server(fastapi_app, async_engine, host=F.host, port=F.port,
               drain_timeout_s=F.drain_timeout_s, log_level=F.log_level,
               access_log=F.access_log)


if __name__ == "__main__":
    app.run(main)

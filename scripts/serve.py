"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

    python scripts/serve.py                        # tiny-llama (random weights)
    python scripts/serve.py --model=/path/to/Meta-Llama-3-8B-Instruct --port=8000
        --served_model_name=llama-3-8b-instruct --api_key=sk-local

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus). SIGTERM drains: new requests get 503,
running ones get up to --drain_timeout_s to finish, then the rest are aborted.

The engine flags are EngineConfig's (the same in every script); knobs left unset are chosen at
start-up from the model, the backend and the free device memory, and logged.
"""
import logging
import time

from absl import flags

from nanoflow_jax import cli

cli.define_engine_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_string("served_model_name", None, "the model name of the API (default: --model)")
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
flags.DEFINE_bool("access_log", True, "log every HTTP request")
F = flags.FLAGS


def main(argv):
    del argv
    config = cli.engine_config()
    cli.setup(config)

    import jax

    from nanoflow_jax.engine.llm_engine import LLMEngine
    from nanoflow_jax.server import AsyncEngine, ServerMetrics, create_app, run_server

    name = F.served_model_name or F.model
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    logging.info("engine ready in %.1fs: %s on %s, max_model_len=%d, %d KV pages of %d tokens",
                 time.perf_counter() - t0, F.model, jax.default_backend(), engine.max_model_len,
                 engine.stats_snapshot().kv_pages_total, engine.config.page_size)
    async_engine = AsyncEngine(engine, max_queue=F.max_queue, metrics=ServerMetrics(name))
    fastapi_app = create_app(async_engine, name, api_key=F.api_key,
                             max_request_bytes=F.max_request_bytes)
    run_server(fastapi_app, async_engine, host=F.host, port=F.port,
               drain_timeout_s=F.drain_timeout_s, log_level=F.log_level,
               access_log=F.access_log)


if __name__ == "__main__":
    cli.run(main)

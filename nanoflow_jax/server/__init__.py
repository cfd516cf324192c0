"""The OpenAI-compatible server: FastAPI routes over an engine thread (`scripts/serve.py`).

Server-only dependencies (fastapi, uvicorn, prometheus_client) are imported here and nowhere in
the model / benchmark path: `pip install -e ".[server]"`.
"""
from nanoflow_jax.server.app import create_app
from nanoflow_jax.server.engine_loop import (AsyncEngine, DrainingError, EngineDeadError,
                                             QueueFullError, RequestStream)
from nanoflow_jax.server.launcher import DrainingServer, run_server
from nanoflow_jax.server.metrics import ServerMetrics

__all__ = ["AsyncEngine", "DrainingError", "DrainingServer", "EngineDeadError",
           "QueueFullError", "RequestStream", "ServerMetrics", "create_app", "run_server"]

"""nanoflow-jax: a throughput-first LLM serving engine in JAX + Pallas (NanoFlow, OSDI '25)."""
from nanoflow_jax.config import ModelConfig, get_preset
from nanoflow_jax.model_loader import Model, load_config, load_model

__all__ = ["Model", "ModelConfig", "get_preset", "load_config", "load_model"]
__version__ = "0.1.0"

"""nanoflow-jax: a throughput-first LLM serving engine in JAX + Pallas (NanoFlow, OSDI '25)."""
from nanoflow_jax.config import EngineConfig, ModelConfig, get_preset
from nanoflow_jax.engine.llm_engine import LLMEngine
from nanoflow_jax.engine.outputs import CompletionOutput, RequestOutput
from nanoflow_jax.llm import LLM
from nanoflow_jax.model_loader import Model, load_config, load_model
from nanoflow_jax.sampling_params import SamplingParams

__all__ = [
    "LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "Model", "ModelConfig",
    "RequestOutput", "SamplingParams", "get_preset", "load_config", "load_model",
]
__version__ = "0.1.0"

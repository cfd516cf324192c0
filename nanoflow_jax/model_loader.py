"""`load_model`: the one-call API for research code (a model from a path or a preset name)."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import parallel, weights
from nanoflow_jax.config import PRESETS, ModelConfig, get_preset
from nanoflow_jax.models import llama
from nanoflow_jax.models.attention import dense_attention, dense_metadata


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: `.config`, `.params`, and `.logits(token_ids)` for one sequence.
    `mesh`: the tensor-parallel mesh the params are sharded over (None: one device)."""

    config: ModelConfig
    params: llama.Params
    mesh: Any = None

    def logits(self, token_ids) -> np.ndarray:
        """Causal forward of one sequence: token ids [n] -> float32 numpy logits [n, vocab]."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        n = ids.shape[0]
        if n == 0:
            raise ValueError("token_ids is empty")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}); got {ids.min()}..{ids.max()}"
            )
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"{n} tokens exceed max_position_embeddings={self.config.max_position_embeddings}"
            )
        # Pad to a power of two so that a few lengths share one compiled program.
        padded = max(16, 1 << (n - 1).bit_length())
        tokens = np.zeros(padded, np.int32)
        tokens[:n] = ids
        meta = dense_metadata([n], pad_to=padded)
        out = _dense_forward(self.params, self.config, jnp.asarray(tokens), meta, self.mesh)
        return np.asarray(out[:n], dtype=np.float32)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _dense_forward(params, config, tokens, meta, mesh):
    logits, _ = parallel.forward_fn(mesh)(
        params, config, tokens, meta.positions, None, meta, None, dense_attention
    )
    return logits


def load_config(path_or_preset: str) -> ModelConfig:
    """A ModelConfig from a checkpoint directory (its config.json) or a preset name."""
    if os.path.isdir(path_or_preset):
        return ModelConfig.from_pretrained(path_or_preset)
    if path_or_preset in PRESETS:
        return get_preset(path_or_preset)
    raise ValueError(
        f"{path_or_preset!r} is neither a checkpoint directory nor a preset "
        f"({', '.join(PRESETS)})"
    )


def load_model(path_or_preset: str, dtype: str = "bfloat16", seed: int = 0,
               tensor_parallel_size: int = 1) -> Model:
    """Load an HF checkpoint directory, one of our orbax checkpoints, or a preset.

    Presets get deterministic random weights from `seed` (nothing is downloaded). With
    `tensor_parallel_size` > 1 the params are created in their shards over that many devices
    (`nanoflow_jax.parallel`).
    """
    config = load_config(path_or_preset)
    mesh = parallel.make_mesh(tensor_parallel_size)
    if mesh is not None:
        parallel.check_divisible(config, tensor_parallel_size)
    if not os.path.isdir(path_or_preset):
        params = weights.random_params(config, dtype, seed, mesh=mesh)
    elif weights.is_orbax_checkpoint(path_or_preset):
        params = weights.restore_params(path_or_preset, config, dtype, mesh=mesh)
    else:
        params = weights.load_hf_params(path_or_preset, config, dtype, mesh=mesh)
    return Model(config=config, params=params, mesh=mesh)

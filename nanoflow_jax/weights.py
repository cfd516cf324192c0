"""Parameters: shapes, random init for presets, HF safetensors loading, orbax save/restore.

The param tree layout is documented in `nanoflow_jax.models.llama`.
"""
from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from nanoflow_jax.config import ModelConfig

Params = dict[str, Any]


def param_shapes(config: ModelConfig) -> Params:
    """The param tree with shape tuples as leaves."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = config.q_size + 2 * config.kv_size
    layer = {
        "attn_norm": (d,),
        "wqkv": (d, qkv),
        "wo": (config.q_size, d),
        "mlp_norm": (d,),
        "w_gate_up": (d, 2 * f),
        "w_down": (f, d),
    }
    if config.attention_bias:
        layer["bqkv"] = (qkv,)
    tree = {
        "embed": (v, d),
        "layers": [_moe_layer_shapes(config, layer) if config.is_moe_layer(i) else dict(layer)
                   for i in range(config.num_layers)],
        "final_norm": (d,),
    }
    if not config.tie_word_embeddings:
        tree["lm_head"] = (d, v)
    return tree


def _moe_layer_shapes(config: ModelConfig, dense_layer: dict) -> dict:
    """An MoE layer's shapes: the attention of `dense_layer`, a router and the experts
    (layout in `nanoflow_jax.models.moe`)."""
    d, e, f = config.hidden_size, config.num_experts, config.moe_intermediate_size
    layer = {k: s for k, s in dense_layer.items() if k not in ("w_gate_up", "w_down")}
    layer.update(router=(d, e), experts_gate_up=(e, d, 2 * f), experts_down=(e, f, d))
    fs = config.shared_expert_intermediate_size
    if fs:
        layer.update(shared_gate_up=(d, 2 * fs), shared_down=(fs, d), shared_gate=(d, 1))
    return layer


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def abstract_params(config: ModelConfig, dtype) -> Params:
    """The param tree as `jax.ShapeDtypeStruct`s (for orbax restore and for sizing memory)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), param_shapes(config), is_leaf=_is_shape
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaf(key, shape, dtype, scale):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def random_params(config: ModelConfig, dtype="bfloat16", seed: int = 0, mesh=None) -> Params:
    """Deterministic random weights, generated on the device (on `mesh`: in their tensor-
    parallel shards, `nanoflow_jax.parallel`, with the same values).

    Projections are N(0, 1/fan_in) so activations keep unit scale through random layers;
    norm weights are 1 and biases small. Each leaf is one call of a small jitted generator
    compiled once per distinct shape (a handful), so even an 80-layer model starts at the
    speed of the random number generator rather than of the compiler.
    """
    shapes = param_shapes(config)
    paths_and_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    dtype = jnp.dtype(dtype)
    key = jax.random.key(seed)
    leaves = []
    for i, (path, shape) in enumerate(paths_and_shapes):
        name = jax.tree_util.keystr(path)
        fan_in = shape[0] if len(shape) == 2 and "embed" not in name else shape[-1]
        if len(shape) == 3:  # stacked experts [E, in, out]
            fan_in = shape[1]
        scale = None if "norm" in name else 0.02 if len(shape) == 1 else fan_in**-0.5
        if mesh is not None:
            from nanoflow_jax import parallel

            leaves.append(parallel.sharded_random_leaf(mesh, config, path[-1].key,
                                                       jax.random.fold_in(key, i), shape, dtype,
                                                       scale))
        elif scale is None:
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append(_random_leaf(jax.random.fold_in(key, i), shape, dtype, scale))
    return jax.tree.unflatten(treedef, leaves)


# ---- HF safetensors -----------------------------------------------------------------------


def _hf_layer_names(config: ModelConfig, i: int) -> dict[str, list[str]]:
    """Our layer key -> the HF tensor names it is built from (in concatenation order)."""
    p = f"model.layers.{i}."
    names = {
        "attn_norm": [p + "input_layernorm.weight"],
        "wqkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "wo": [p + "self_attn.o_proj.weight"],
        "mlp_norm": [p + "post_attention_layernorm.weight"],
        "w_gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "w_down": [p + "mlp.down_proj.weight"],
    }
    if config.attention_bias:
        names["bqkv"] = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if config.is_moe_layer(i):
        del names["w_gate_up"], names["w_down"]
        if config.architecture == "MixtralForCausalLM":
            names["router"] = [p + "block_sparse_moe.gate.weight"]
        else:
            names["router"] = [p + "mlp.gate.weight"]
        if config.shared_expert_intermediate_size:
            s = p + "mlp.shared_expert."
            names["shared_gate_up"] = [s + "gate_proj.weight", s + "up_proj.weight"]
            names["shared_down"] = [s + "down_proj.weight"]
            names["shared_gate"] = [p + "mlp.shared_expert_gate.weight"]
    return names


def _hf_expert_names(config: ModelConfig, i: int) -> dict[str, list[list[str]]]:
    """Our stacked expert key -> per expert, the HF tensor names it is built from."""
    if not config.is_moe_layer(i):
        return {}
    if config.architecture == "MixtralForCausalLM":  # w1 = gate, w3 = up, w2 = down
        p = f"model.layers.{i}.block_sparse_moe.experts."
        gate, up, down = "w1", "w3", "w2"
    else:
        p = f"model.layers.{i}.mlp.experts."
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    experts = range(config.num_experts)
    return {"experts_gate_up": [[f"{p}{e}.{gate}.weight", f"{p}{e}.{up}.weight"]
                                for e in experts],
            "experts_down": [[f"{p}{e}.{down}.weight"] for e in experts]}


def _hf_expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model needs, with its HF shape (nn.Linear stores [out, in])."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for x, n in (("q", config.q_size), ("k", config.kv_size), ("v", config.kv_size)):
            out[p + f"self_attn.{x}_proj.weight"] = (n, d)
            if config.attention_bias:
                out[p + f"self_attn.{x}_proj.bias"] = (n,)
        out[p + "self_attn.o_proj.weight"] = (d, config.q_size)
        if config.is_moe_layer(i):
            out.update(_hf_moe_shapes(config, i))
            continue
        out[p + "mlp.gate_proj.weight"] = (f, d)
        out[p + "mlp.up_proj.weight"] = (f, d)
        out[p + "mlp.down_proj.weight"] = (d, f)
    return out


def _hf_moe_shapes(config: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """HF shapes of MoE layer i's router, experts and shared expert."""
    d, fe = config.hidden_size, config.moe_intermediate_size
    fs = config.shared_expert_intermediate_size
    names = _hf_layer_names(config, i)
    out = {names["router"][0]: (config.num_experts, d)}
    for gate, up in _hf_expert_names(config, i)["experts_gate_up"]:
        out[gate] = out[up] = (fe, d)
    for (down,) in _hf_expert_names(config, i)["experts_down"]:
        out[down] = (d, fe)
    if fs:
        gate, up = names["shared_gate_up"]
        out[gate] = out[up] = (fs, d)
        out[names["shared_down"][0]] = (d, fs)
        out[names["shared_gate"][0]] = (1, d)
    return out


def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it (single file or sharded)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    out = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            out.update({name: file for name in f.keys()})
    return out


def load_hf_params(path: str, config: ModelConfig, dtype="bfloat16", mesh=None) -> Params:
    """Load an HF checkpoint directory into our param tree, checking every tensor's shape.

    A missing tensor raises KeyError and a mis-shaped one ValueError, naming the tensor and
    the file. Tensors the model does not use (e.g. rotary caches) are ignored. On `mesh`
    each device reads only its shard (`parallel.load_hf_sharded`).
    """
    if mesh is not None:
        from nanoflow_jax import parallel

        return parallel.load_hf_sharded(path, config, dtype, mesh)
    files = _tensor_files(path)
    expected = _hf_expected_shapes(config)
    missing = [name for name in expected if name not in files]
    if missing:
        raise KeyError(
            f"checkpoint {path!r} lacks {len(missing)} tensor(s) the "
            f"{config.architecture} config needs, first: {missing[0]!r}"
        )
    handles: dict[str, Any] = {}
    try:
        def get(name: str) -> np.ndarray:
            file = files[name]
            if file not in handles:
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{file!r} (holding {name!r}) does not exist")
                handles[file] = safe_open(file, framework="numpy").__enter__()
            shape = tuple(handles[file].get_slice(name).get_shape())
            if shape != expected[name]:
                raise ValueError(
                    f"tensor {name!r} in {os.path.basename(file)!r} has shape {shape}, "
                    f"expected {expected[name]}"
                )
            return handles[file].get_tensor(name)

        def put(x: np.ndarray) -> jax.Array:
            return jnp.asarray(x, dtype=jnp.dtype(dtype))

        params: Params = {
            "embed": put(get("model.embed_tokens.weight")),
            "final_norm": put(get("model.norm.weight")),
            "layers": [],
        }
        if not config.tie_word_embeddings:
            params["lm_head"] = put(get("lm_head.weight").T)
        for i in range(config.num_layers):
            layer = {}
            for key, names in _hf_layer_names(config, i).items():
                parts = [get(n) for n in names]
                if parts[0].ndim == 2:  # [out, in] -> [in, out], fused along out
                    layer[key] = put(np.concatenate([p.T for p in parts], axis=1))
                else:
                    layer[key] = put(np.concatenate(parts))
            for key, per_expert in _hf_expert_names(config, i).items():  # -> [E, in, out]
                layer[key] = put(np.stack([np.concatenate([get(n).T for n in names], axis=1)
                                           for names in per_expert]))
            params["layers"].append(layer)
        return params
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


# ---- our own checkpoints (orbax) ----------------------------------------------------------

ORBAX_DIR = "params"


def save_checkpoint(path: str, config: ModelConfig, params: Params) -> None:
    """Write `config.json` and the param tree (orbax) under `path`."""
    import orbax.checkpoint as ocp

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(os.path.abspath(path), ORBAX_DIR), params)


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ORBAX_DIR))


def _stored_shapes(ckpt, directory: str):
    """The shape tree of an orbax param checkpoint, from its metadata (nothing is read)."""
    meta = ckpt.metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return _layers_as_list(
        jax.tree.map(lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, "shape")))


def _layers_as_list(tree):
    """A restored tree with its "layers" as a list: some orbax versions give lists back as
    dicts keyed "0", "1", ..."""
    layers = tree.get("layers") if isinstance(tree, dict) else None
    if isinstance(layers, dict):
        tree["layers"] = [layers[str(i)] for i in range(len(layers))]
    return tree


def restore_params(path: str, config: ModelConfig, dtype="bfloat16", mesh=None) -> Params:
    """Restore a param tree written by `save_checkpoint`, cast to `dtype` as it is read.

    On `mesh` each device reads only its block of every leaf (orbax restores onto the target
    shardings `parallel.natural_shardings`), and `parallel.relayout` moves the fused leaves'
    columns into their tensor-parallel shards: no device holds the model, nor a whole leaf
    of it but for the norms and biases."""
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(path), ORBAX_DIR)
    expected = param_shapes(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, expected, is_leaf=_is_shape)
    else:
        from nanoflow_jax import parallel

        shardings = parallel.natural_shardings(expected, config, mesh)
    target = jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(
        shape, jnp.dtype(dtype), sharding=sharding), expected, shardings, is_leaf=_is_shape)
    with ocp.StandardCheckpointer() as ckpt:
        if _stored_shapes(ckpt, directory) != expected:
            raise ValueError(f"orbax checkpoint {path!r} does not match its config.json shapes")
        params = _layers_as_list(ckpt.restore(directory, target))
    if mesh is not None:
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: parallel.relayout(mesh, config, p[-1].key, x), params)
    return params

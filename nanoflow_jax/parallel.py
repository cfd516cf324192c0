"""Tensor parallelism: the device mesh, the sharded param layout, the sharded forward, and
multi-host start-up.

Megatron's layout over one mesh axis `tp` of N devices:

    wqkv, bqkv   column-parallel: shard i holds its Hq/N query heads and their KV heads
    w_gate_up    column-parallel: shard i holds gate and up columns [i·F/N, (i+1)·F/N)
    wo, w_down   row-parallel: the rows matching those heads / FFN columns
    embed        vocab rows [i·V/N, (i+1)·V/N) (whole on every shard if N does not divide V)
    lm_head      vocab columns likewise; norms whole on every shard
    KV cache     by KV head, [N·Hkv/N, pages, page, Dh] sharded on the head axis

The fused weights are stored in a *tp layout*: the global wqkv is the shards' blocks side by
side, [D, N·(Hq/N + 2·Hkv')·Dh] with block i = (q_i | k_i | v_i), and w_gate_up likewise
(g_i | u_i). Each shard's slice is then exactly the fused weight of a model with Hq/N heads,
Hkv' KV heads and F/N FFN columns, so the model code runs unchanged inside `shard_map` on a
per-shard `ModelConfig` (`local_config`). With fewer KV heads than shards (Hkv < N, N a
multiple of Hkv) each shard keeps one KV head (Hkv' = 1), duplicated over the N/Hkv shards
whose query heads use it, in its weights and in its KV cache.

The residual stream is a partial sum over the shards and is summed before every norm: one
all-reduce after o_proj and one after down per layer, as in Megatron, each a `lax.psum`
inside the shard_map. The sequential schedule fuses them into the norms
(`llama.reduce_residual`); a nano-batch schedule issues them as its collective ops, one per
nano-batch (`pipeline/schedule.py`, `docs/tensor_parallel.md`). The Pallas attention kernels
run per shard on the shard's heads, as on one device.

Weights reach their shards without any device holding the model: random leaves are drawn
and orbax leaves restored in the natural layout already sharded (`natural_spec`), and
`relayout` moves the fused leaves' columns; safetensors blocks are read per device
(`load_hf_sharded`).

With tensor_parallel_size 1 none of this is used: no mesh, no shard_map, unsharded params and
cache, so the single-device step is the same program as without this module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanoflow_jax.config import ModelConfig

TP_AXIS = "tp"
Params = dict[str, Any]

# ---- the mesh ------------------------------------------------------------------------------


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh | None:
    """A 1-D mesh `tp` over the first `tensor_parallel_size` devices (all processes' devices
    after `jax.distributed.initialize`); None for 1 (the unsharded path)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size == 1:
        return None
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} exceeds the "
                         f"{len(devices)} {devices[0].platform} device(s) visible to JAX")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[TP_AXIS]


# ---- the layout ----------------------------------------------------------------------------


def check_divisible(config: ModelConfig, tp: int) -> None:
    """Raises ValueError naming tensor_parallel_size when `config` cannot be split `tp` ways."""
    if tp > 1 and config.num_experts:
        raise ValueError(f"tensor_parallel_size={tp}: mixture-of-experts models run on one "
                         "device (their experts are not sharded yet); use tensor_parallel_size=1")
    hkv = config.num_kv_heads
    problems = []
    if config.num_heads % tp:
        problems.append(f"the {config.num_heads} attention heads")
    if hkv % tp and tp % hkv:
        problems.append(f"the {hkv} KV heads (nor is it a multiple of them)")
    if config.intermediate_size % tp:
        problems.append(f"the FFN size {config.intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={tp} does not divide " + ", ".join(problems))


def kv_heads_per_shard(config: ModelConfig, tp: int) -> int:
    """KV heads each shard holds: Hkv/tp, or 1 (duplicated) when there are fewer than tp."""
    return max(1, config.num_kv_heads // tp)


def kv_head_start(config: ModelConfig, tp: int, shard: int) -> int:
    """The first (global) KV head of `shard`; its query heads all use this one or the next."""
    return shard * config.num_kv_heads // tp


def vocab_is_sharded(config: ModelConfig, tp: int) -> bool:
    return config.vocab_size % tp == 0


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config one shard's model code sees inside shard_map (vocab_size stays global)."""
    check_divisible(config, tp)
    return dataclasses.replace(
        config, num_heads=config.num_heads // tp, num_kv_heads=kv_heads_per_shard(config, tp),
        intermediate_size=config.intermediate_size // tp, tp_axis=TP_AXIS)


def fused_columns(config: ModelConfig, tp: int, name: str) -> np.ndarray | None:
    """For a fused column-parallel leaf (wqkv, bqkv, w_gate_up): the natural column each
    column of its tp layout holds ([tp-layout width] int64). None for the other leaves, whose
    tp layout is the natural one."""
    blocks = []
    if name in ("wqkv", "bqkv"):
        dh, hq, hkv = config.head_dim, config.num_heads // tp, kv_heads_per_shard(config, tp)
        for i in range(tp):
            k0 = config.q_size + kv_head_start(config, tp, i) * dh
            blocks += [np.arange(i * hq * dh, (i + 1) * hq * dh), np.arange(k0, k0 + hkv * dh),
                       config.kv_size + np.arange(k0, k0 + hkv * dh)]
    elif name == "w_gate_up":
        f = config.intermediate_size // tp
        for i in range(tp):
            blocks += [np.arange(i * f, (i + 1) * f),
                       config.intermediate_size + np.arange(i * f, (i + 1) * f)]
    else:
        return None
    return np.concatenate(blocks)


def leaf_spec(name: str, config: ModelConfig, tp: int) -> P:
    """The PartitionSpec of the param leaf called `name` (its key in the param tree)."""
    if name in ("wqkv", "w_gate_up"):
        return P(None, TP_AXIS)
    if name == "bqkv":
        return P(TP_AXIS)
    if name in ("wo", "w_down"):
        return P(TP_AXIS, None)
    if name == "embed":
        return P(TP_AXIS, None) if vocab_is_sharded(config, tp) else P()
    if name == "lm_head":
        return P(None, TP_AXIS) if vocab_is_sharded(config, tp) else P()
    return P()  # norms


def _leaf_name(path) -> str:
    return path[-1].key


def param_specs(params: Params, config: ModelConfig, tp: int) -> Params:
    """The PartitionSpec tree of a param tree (any leaves: arrays, shapes, ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: leaf_spec(_leaf_name(path), config, tp), params,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x))


def tp_layout(name: str, natural, config: ModelConfig, tp: int):
    """A leaf in our natural layout (`weights.param_shapes`) -> its global tp layout."""
    columns = fused_columns(config, tp, name)
    return natural if columns is None else natural[..., columns]


def tp_shape(name: str, shape: tuple[int, ...], config: ModelConfig, tp: int) -> tuple[int, ...]:
    columns = fused_columns(config, tp, name)
    return shape if columns is None else shape[:-1] + (len(columns),)


def kv_cache_heads(config: ModelConfig, tp: int) -> int:
    """KV heads of the global (sharded) cache: Hkv, or tp when heads are duplicated."""
    return tp * kv_heads_per_shard(config, tp)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(TP_AXIS))


# ---- placing params in their shards ---------------------------------------------------------


@functools.cache
def _layout_program(mesh: Mesh, config: ModelConfig, name: str):
    """jit(natural leaf -> its tp layout, in its shards), one per leaf kind; the input may be
    anywhere (host, one device, or sharded by `natural_spec`)."""
    tp = mesh_size(mesh)
    return jax.jit(lambda natural: tp_layout(name, natural, config, tp),
                   out_shardings=NamedSharding(mesh, leaf_spec(name, config, tp)))


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """A natural-layout param tree (host or device arrays) -> the tp layout in its shards."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _layout_program(mesh, config, _leaf_name(path))(x), params)


def natural_spec(name: str, shape: tuple[int, ...], config: ModelConfig, tp: int) -> P:
    """How a leaf in our natural layout is sharded on its way to the tp layout (random init,
    orbax restore): the leaf's own spec where the natural layout is the tp layout; rows
    for the fused 2-D leaves (`relayout` then moves the columns to their shards); whole for
    the fused biases (a vector) and for rows that do not split."""
    if fused_columns(config, tp, name) is None:
        return leaf_spec(name, config, tp)
    if len(shape) == 2 and shape[0] % tp == 0:  # [D, W]: each device D/tp rows
        return P(TP_AXIS, None)
    return P()


def relayout(mesh: Mesh, config: ModelConfig, name: str, natural: jax.Array) -> jax.Array:
    """A leaf in its natural layout, sharded by `natural_spec`, -> its tp layout in its
    shards (the same array where the two layouts agree). From rows, XLA moves each row block's
    columns to their shards: per device a few blocks of the leaf, never the whole of it."""
    if fused_columns(config, mesh_size(mesh), name) is None:
        return natural
    return _layout_program(mesh, config, name)(natural)


def natural_shardings(shapes: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """The `natural_spec` NamedSharding of every leaf of a shape tree (`weights.param_shapes`)."""
    tp = mesh_size(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: NamedSharding(mesh, natural_spec(_leaf_name(path), shape, config,
                                                             tp)),
        shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x))


@functools.cache
def _random_program(sharding: NamedSharding, shape, dtype, scale):
    from nanoflow_jax import weights

    def run(key):
        if scale is None:
            return jnp.ones(shape, dtype)
        return weights._random_leaf(key, shape, dtype, scale)

    return jax.jit(run, out_shardings=sharding)


def sharded_random_leaf(mesh: Mesh, config: ModelConfig, name: str, key, shape, dtype,
                        scale: float | None) -> jax.Array:
    """`weights._random_leaf(key, shape, dtype, scale)` (ones for scale None) in its tp layout
    and its shards: generated in the natural layout sharded by `natural_spec` (threefry is
    partitionable: each device draws only its block, and the values are the unsharded ones),
    then `relayout`."""
    spec = natural_spec(name, tuple(shape), config, mesh_size(mesh))
    natural = _random_program(NamedSharding(mesh, spec), tuple(shape), jnp.dtype(dtype),
                              scale)(key)
    return relayout(mesh, config, name, natural)


def _runs(columns: np.ndarray, part_offsets: np.ndarray):
    """Splits increasing-by-one runs of `columns` that stay within one part: [(start, stop)]."""
    cut = (np.diff(columns) != 1) | np.isin(columns[1:], part_offsets)
    for run in np.split(columns, np.flatnonzero(cut) + 1):
        yield int(run[0]), int(run[-1]) + 1


def _read_block(tensor, parts, sizes, natural, transpose, index, columns, dtype) -> np.ndarray:
    """natural[index'] of a leaf whose natural layout is
    concat([hf.T if transpose else hf for hf in parts], axis=-1), reading only the rows the
    block needs from safetensors. `natural` is the leaf's natural shape, `index` indexes its
    tp layout; `columns` maps the last axis to natural columns (None: the identity).
    `tensor(name)` gives a safetensors slice."""
    *lead, last = index
    cols = np.arange(natural[-1])[last] if columns is None else columns[last]
    offsets = np.cumsum([0] + list(sizes))
    lead = [slice(*s.indices(n)[:2]) for s, n in zip(lead, natural)]  # explicit bounds
    blocks = []
    for start, stop in _runs(cols, offsets):
        p = int(np.searchsorted(offsets, start, side="right")) - 1
        a, b = start - offsets[p], stop - offsets[p]
        sl = tensor(parts[p])
        if not lead:  # 1-D: norms, biases
            block = sl[a:b]
        elif transpose:  # nn.Linear [out, in]: our columns are its rows
            block = sl[a:b, lead[0]].T
        else:  # the embedding [V, D]: natural layout
            block = sl[lead[0], a:b]
        blocks.append(np.asarray(block).astype(dtype))
    return np.concatenate(blocks, axis=-1)


def load_hf_sharded(path: str, config: ModelConfig, dtype, mesh: Mesh) -> Params:
    """An HF safetensors checkpoint straight into its shards: each device's array is read from
    the files alone (`jax.make_array_from_callback`), so no device or host holds the model."""
    from nanoflow_jax import weights

    tp, dtype = mesh_size(mesh), jnp.dtype(dtype)
    check_divisible(config, tp)
    files = weights._tensor_files(path)
    expected = weights._hf_expected_shapes(config)
    missing = [name for name in expected if name not in files]
    if missing:
        raise KeyError(f"checkpoint {path!r} lacks {len(missing)} tensor(s) the "
                       f"{config.architecture} config needs, first: {missing[0]!r}")
    with contextlib.ExitStack() as stack:
        handles = {}

        def tensor(name):
            file = files[name]
            if file not in handles:
                from safetensors import safe_open

                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{file!r} (holding {name!r}) does not exist")
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            return handles[file].get_slice(name)

        for name, shape in expected.items():
            got = tuple(tensor(name).get_shape())
            if got != shape:
                raise ValueError(f"tensor {name!r} in {os.path.basename(files[name])!r} has "
                                 f"shape {got}, expected {shape}")

        def leaf(key, parts, transpose):
            first = expected[parts[0]]
            if len(first) == 1:  # norms, biases: concatenated 1-D
                sizes = [expected[n][0] for n in parts]
                natural = (sum(sizes),)
            elif transpose:  # nn.Linear weights [out, in], fused along out -> [in, sum(out)]
                sizes = [expected[n][0] for n in parts]
                natural = (first[1], sum(sizes))
            else:  # the embedding, [V, D] as stored
                sizes, natural = [first[1]], first
            columns = fused_columns(config, tp, key)
            return jax.make_array_from_callback(
                tp_shape(key, natural, config, tp),
                NamedSharding(mesh, leaf_spec(key, config, tp)),
                lambda index: _read_block(tensor, parts, sizes, natural, transpose, index,
                                          columns, dtype))

        params: Params = {
            "embed": leaf("embed", ["model.embed_tokens.weight"], False),
            "final_norm": leaf("final_norm", ["model.norm.weight"], False),
            "layers": [],
        }
        if not config.tie_word_embeddings:
            params["lm_head"] = leaf("lm_head", ["lm_head.weight"], True)
        for i in range(config.num_layers):
            params["layers"].append({
                key: leaf(key, names, len(expected[names[0]]) == 2)
                for key, names in weights._hf_layer_names(config, i).items()})
        return params


# ---- the sharded forward ---------------------------------------------------------------------


def sharded_forward(params, config, token_ids, positions, kv_cache, attn_metadata,
                    logits_indices, attention, layers_fn=None, head=True, *, mesh: Mesh):
    """`llama.forward` (same arguments and results, global arrays) run on `mesh`: the whole
    model inside one `shard_map`, each shard on its heads, FFN columns, vocab rows and KV
    heads, with the batch and its metadata replicated. Logits come back [N, V], sharded by
    vocab where the head is (with `head` False: the hidden states [N, D], replicated). Call it
    under `jax.jit`."""
    from nanoflow_jax.models import llama

    tp = mesh_size(mesh)
    local = local_config(config, tp)
    layers_fn = layers_fn or llama.run_layers

    def body(params, token_ids, positions, kv_cache, attn_metadata, logits_indices):
        return llama.forward(params, local, token_ids, positions, kv_cache, attn_metadata,
                             logits_indices, attention, layers_fn, head)

    kv_spec = P() if kv_cache is None else [(P(TP_AXIS), P(TP_AXIS))] * len(kv_cache)
    logits_spec = P(None, TP_AXIS) if head and vocab_is_sharded(config, tp) else P()
    run = jax.shard_map(
        body, mesh=mesh,
        in_specs=(param_specs(params, config, tp), P(), P(), kv_spec, P(), P()),
        out_specs=(logits_spec, kv_spec),
        # Pallas calls carry no replication info; the specs above are the contract.
        check_vma=False)
    return run(params, token_ids, positions, kv_cache, attn_metadata, logits_indices)


def forward_fn(mesh: Mesh | None):
    """`llama.forward`, or its sharded version on `mesh` (None: the single-device one)."""
    from nanoflow_jax.models import llama

    return llama.forward if mesh is None else functools.partial(sharded_forward, mesh=mesh)


def compiler_options(mesh: Mesh | None, schedule) -> dict[str, str]:
    """XLA options (GPU) for a tensor-parallel step that runs a nano-batch schedule. Each
    nano-batch has its own all-reduces (the schedule's collective ops), independent of the
    other nano-batches' GEMMs; to overlap them with those GEMMs XLA needs

      - its latency hiding scheduler, which issues an async all-reduce's start early and its
        done late, with independent work (the other nano-batches' GEMMs) between, and
      - no all-reduce combining: the combiner merges independent all-reduces into one (seen in
        the CPU HLO), which would make every nano-batch wait for the last.

    All-reduces are async by default (`xla_gpu_disable_async_collectives` empty). Nothing
    without a mesh or for the sequential schedule, whose all-reduces have nothing to overlap."""
    if mesh is None or schedule.is_sequential:
        return {}
    return {"xla_gpu_enable_latency_hiding_scheduler": "True",
            "xla_gpu_all_reduce_combine_threshold_bytes": "0"}


# ---- multi-host ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Flags of `maybe_initialize_distributed`, for every entry point (multi-host runs)."""

    coordinator_address: str | None = dataclasses.field(default=None, metadata={"help": (
        "host:port of process 0's coordinator for jax.distributed.initialize (multi-host: "
        "the mesh then spans every process's devices); unset: one process, local devices")})
    num_processes: int = dataclasses.field(default=1, metadata={"help": (
        "Processes in a multi-host run (with coordinator_address)")})
    process_id: int = dataclasses.field(default=0, metadata={"help": (
        "This process's rank, 0..num_processes-1 (with coordinator_address)")})


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int = 1, process_id: int = 0) -> bool:
    """`jax.distributed.initialize` when a coordinator is given (before anything else touches
    JAX's devices); returns whether it ran. On the CPU it selects gloo collectives, so a mesh
    over several processes' CPU devices can run psum."""
    if not coordinator_address:
        if num_processes != 1 or process_id != 0:
            raise ValueError("num_processes / process_id need coordinator_address")
        return False
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if (os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
            and hasattr(jax.config, "jax_cpu_collectives_implementation")):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True

"""The device side of the engine: weights, the KV cache, and one jitted step per bucket.

A step is two jitted programs: `_forward(params, kv, batch, prev_tokens) -> (logits, kv)` runs
embed → layers → logits at the sampled rows with the KV cache donated (updated in place), and
`_sample_rows(logits, sampling, mode)` samples on the device, compiled once per `SampleMode`
(what the batch's rows need, known on the host), so neither program holds a device-side branch
that would make the host wait. The runner is asynchronous: `dispatch` enqueues a step and
returns at once with device arrays; a decode whose input token is still being sampled by the
previous step names that step's sample row (`future_rows`), and the step reads it from
`prev_tokens` on the device.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import parallel
from nanoflow_jax.batch import BatchShape, SeqChunk, build_batch
from nanoflow_jax.config import EngineConfig, ModelConfig
from nanoflow_jax.engine.sampler import SampleMode, SampleOutput, sample, sampling_tensors
from nanoflow_jax.engine.scheduler import SchedulerOutput
from nanoflow_jax.engine.sequence import PENDING, Sequence
from nanoflow_jax.kv_cache import init_kv_cache, page_bytes
from nanoflow_jax.model_loader import load_model
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.spec import named_schedule
from nanoflow_jax.sampling_params import MAX_LOGPROBS

log = logging.getLogger("nanoflow_jax")

CPU_KV_BYTES = 1 << 30  # KV budget where the backend reports no memory (the CPU)


def _forward(params, kv, batch, prev_tokens, *, config, attention, layers_fn,
             forward=llama.forward):
    """One iteration's model on the device -> (logits [num_logits, V], kv). prev_tokens
    [num_rows]: the previous step's samples. `forward`: llama.forward or its tensor-parallel
    version (`parallel.forward_fn`)."""
    future = batch.future_rows
    token_ids = jnp.where(future >= 0, prev_tokens[jnp.maximum(future, 0)], batch.token_ids)
    return forward(params, config, token_ids, batch.positions, kv, batch.attn,
                         batch.logits_indices, attention, layers_fn)


def _sample_rows(logits, sampling, *, mode, num_rows):
    out = sample(logits, sampling, MAX_LOGPROBS, mode)
    # Every bucket returns num_rows rows, so the next step's prev_tokens has one shape.
    pad = num_rows - logits.shape[0]
    return jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), out)


@dataclasses.dataclass
class InFlight:
    """A dispatched step: its device samples and which sequence owns which sample row."""

    samples: SampleOutput  # device arrays, [num_rows]
    owners: list[tuple[Sequence, int, int]]  # (sequence, index in its output, sample row)
    build_s: float  # host time to build the batch and sampling tensors
    launch_s: float  # the jitted call: returns once the step is enqueued on the device


class ModelRunner:
    def __init__(self, config: EngineConfig):
        config = config.for_backend(jax.default_backend())
        self.config = config
        t0 = time.perf_counter()
        model = load_model(config.model, dtype=config.dtype, seed=config.seed,
                           tensor_parallel_size=config.tensor_parallel_size)
        self.model_config: ModelConfig = model.config
        self.params = model.params
        self.mesh = model.mesh  # None: one device
        jax.block_until_ready(self.params)
        self.load_time = time.perf_counter() - t0

        mc = model.config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context "
                             f"({mc.max_position_embeddings}): lower --max_model_len")
        if mc.sliding_window is not None and self.max_model_len > mc.sliding_window:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's sliding "
                             f"window ({mc.sliding_window}), which the attention kernels do not "
                             f"implement: lower --max_model_len to {mc.sliding_window} or less")
        self.max_pages = -(-self.max_model_len // config.page_size)
        self.max_decode = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.num_rows = self.max_decode + config.max_prefill_seqs
        self.buckets = config.token_buckets()
        # Before the KV cache: `auto` may profile the ops on the device first.
        self.schedule = named_schedule(config.schedule, config.max_num_batched_tokens,
                                       model_config=mc, dtype=config.dtype)
        self.num_pages = config.num_pages or self._pages_from_memory()
        if self.num_pages < self.max_pages:
            raise ValueError(
                f"the KV cache holds {self.num_pages} pages ({self.num_pages * config.page_size}"
                f" tokens) but one sequence of max_model_len={self.max_model_len} needs "
                f"{self.max_pages}: lower max_model_len or raise gpu_memory_utilization "
                f"(or num_pages)")
        t0 = time.perf_counter()
        kv_dtype = jnp.dtype(config.dtype)
        self.kv = init_kv_cache(mc, self.num_pages, config.page_size, kv_dtype, self.mesh)
        self.kv_time = time.perf_counter() - t0
        log.info("KV cache: %d pages of %d tokens = %d tokens (%.2f GiB); %.1f sequences of "
                 "max_model_len=%d", self.num_pages, config.page_size,
                 self.num_pages * config.page_size,
                 self.num_pages * page_bytes(mc, config.page_size, kv_dtype,
                                             config.tensor_parallel_size) / 2**30,
                 self.num_pages / self.max_pages, self.max_model_len)
        layers_fn = (llama.run_layers if self.schedule.is_sequential
                     else make_layers_fn(self.schedule))
        on_gpu = jax.default_backend() == "gpu"
        self._forward = jax.jit(
            functools.partial(_forward, config=mc, attention=attention_fn(config.attention_impl),
                              layers_fn=layers_fn, forward=parallel.forward_fn(self.mesh)),
            donate_argnums=(1,),
            compiler_options={**self.schedule.compiler_options(),
                              **parallel.compiler_options(self.mesh, self.schedule)}
            if on_gpu else None,
        )
        self._sample = jax.jit(functools.partial(_sample_rows, num_rows=self.num_rows),
                               static_argnames="mode")
        self._prev_tokens = jnp.zeros((self.num_rows,), jnp.int32)
        self.compile_time = 0.0

    def _pages_from_memory(self) -> int:
        """Pages that fit in the device memory left after weights and an activation reserve."""
        mc, cfg = self.model_config, self.config
        stats = jax.devices()[0].memory_stats() or {}
        per_page = page_bytes(mc, cfg.page_size, jnp.dtype(cfg.dtype), cfg.tensor_parallel_size)
        if "bytes_limit" not in stats:
            return max(1, min(CPU_KV_BYTES // per_page, cfg.max_num_seqs * self.max_pages))
        t = cfg.max_num_batched_tokens
        widest = max(mc.hidden_size, mc.q_size + 2 * mc.kv_size, 2 * mc.intermediate_size)
        reserve = (8 * t * widest * jnp.dtype(cfg.dtype).itemsize  # live activations
                   + 4 * self.num_rows * mc.vocab_size * 4  # fp32 logits and sampling
                   + (1 << 30))  # XLA / cuBLAS workspaces
        free = stats["bytes_limit"] * cfg.gpu_memory_utilization - stats["bytes_in_use"] - reserve
        if free < per_page * self.max_pages:
            raise ValueError(
                f"after the weights ({stats['bytes_in_use'] / 2**30:.1f} GiB) only "
                f"{max(free, 0) / 2**30:.2f} GiB are left for the KV cache: raise "
                f"gpu_memory_utilization, lower max_model_len or max_num_batched_tokens")
        return int(free // per_page)

    def shape_for(self, num_tokens: int) -> BatchShape:
        t = next((b for b in self.buckets if b >= num_tokens), None)
        if t is None:
            raise ValueError(f"{num_tokens} tokens exceed the dense batch {self.buckets[-1]}")
        return BatchShape(num_tokens=t, num_decode=min(self.max_decode, t),
                          num_prefill_seqs=min(self.config.max_prefill_seqs, t),
                          max_pages=self.max_pages)

    @property
    def num_compiled(self) -> int:
        """Programs compiled so far for the step: the model's and the sampler's (a test checks
        none appear after warm-up)."""
        return self._forward._cache_size() + self._sample._cache_size()

    def warmup(self) -> None:
        """Compile (and run once) the model of every bucket and its sampler in every mode."""
        t0 = time.perf_counter()
        for t in self.buckets:
            shape = self.shape_for(t)
            batch = build_batch([], [], shape, self.config.page_size)
            sampling = sampling_tensors([], [], [], pad_to=shape.num_logits)
            for mode in SampleMode.all():
                jax.block_until_ready(self.run_step(batch, sampling, mode))
        self.compile_time = time.perf_counter() - t0
        log.info("compiled %d buckets %s in %.1fs", len(self.buckets), self.buckets,
                 self.compile_time)

    @staticmethod
    def _sampling_rows(owners, num_rows: int):
        """Sampling tensors [num_rows]: each owner's parameters at its row, greedy elsewhere."""
        dense = sampling_tensors([s.params for s, _, _ in owners], [s.seed for s, _, _ in owners],
                                 [i for _, i, _ in owners])
        rows = np.fromiter((r for _, _, r in owners), np.int64, len(owners))
        padded = sampling_tensors([], [], [], pad_to=num_rows)
        for full, part in zip(jax.tree.leaves(padded), jax.tree.leaves(dense)):
            full[rows] = part
        return padded

    def run_step(self, batch, sampling, mode: SampleMode) -> SampleOutput:
        """Enqueue the model and the sampler on a built batch; the samples become the next
        step's prev_tokens."""
        logits, self.kv = self._forward(self.params, self.kv, batch, self._prev_tokens)
        samples = self._sample(logits, sampling, mode=mode)
        self._prev_tokens = samples.token_ids
        return samples

    def dispatch(self, sched: SchedulerOutput, shape: BatchShape | None = None) -> InFlight:
        """Enqueue one step on the device; returns without waiting for it."""
        t0 = time.perf_counter()
        shape = shape or self.shape_for(sched.num_tokens)
        owners = []  # (sequence, output index, sample row) of every token sampled this step

        def seq_chunk(chunk, row) -> SeqChunk:
            seq = chunk.seq
            if chunk.num_tokens == 1:  # decodes: hundreds per step
                ids = [seq.token_at(chunk.start)]
            else:
                ids = seq.tokens(chunk.start, chunk.start + chunk.num_tokens)
            future_row = -1
            if ids[-1] == PENDING:  # a decode of the token the previous step is sampling
                if chunk.num_tokens != 1 or seq.sample_row < 0:
                    raise AssertionError("a pending token can only be a decode's input")
                future_row, ids = seq.sample_row, [0]
            if chunk.samples:
                out_index = len(seq.output_token_ids) - 1
                owners.append((seq, out_index, row))
            return SeqChunk(ids, chunk.start, seq.page_array, future_row)

        # Sample rows: decode i -> row i; prompt chunk j -> row Bd + j.
        decodes = [seq_chunk(c, i) for i, c in enumerate(sched.decodes)]
        prefills = [seq_chunk(c, shape.num_decode + j) for j, c in enumerate(sched.prefills)]
        batch = build_batch(decodes, prefills, shape, self.config.page_size)
        sampling = self._sampling_rows(owners, shape.num_logits)
        t1 = time.perf_counter()
        samples = self.run_step(batch, sampling, SampleMode.of([s.params for s, _, _ in owners]))
        for seq, _, row in owners:
            seq.sample_row = row
        return InFlight(samples, owners, t1 - t0, time.perf_counter() - t1)

"""The device side of the engine: weights, the KV cache, and one compiled step per bucket.

A step is two programs: `_forward(params, kv, batch, prev_tokens) -> (logits, kv)` runs
embed → layers → logits at the sampled rows with the KV cache donated (updated in place), and
`_sample_rows(logits, sampling, mode)` samples on the device, compiled once per `SampleMode`
(what the batch's rows need, known on the host), so neither program holds a device-side branch
that would make the host wait. All are compiled at start-up, before the KV cache is allocated:
the cache gets what the memory budget leaves after the weights and the largest program's
workspace (`_size_kv_cache`). The runner is asynchronous: `dispatch` enqueues a step and
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
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from nanoflow_jax import device_memory, parallel
from nanoflow_jax.batch import BatchShape, SeqChunk, build_batch
from nanoflow_jax.config import EngineConfig, ModelConfig
from nanoflow_jax.device_memory import MemoryPlan, ProgramMemory, program_memory
from nanoflow_jax.engine.sampler import SampleMode, SampleOutput, sample, sampling_tensors
from nanoflow_jax.engine.scheduler import SchedulerOutput
from nanoflow_jax.engine.sequence import PENDING, Sequence
from nanoflow_jax.kv_cache import init_kv_cache, kv_cache_spec, page_bytes
from nanoflow_jax.model_loader import load_model
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.spec import named_schedule
from nanoflow_jax.sampling_params import MAX_LOGPROBS

log = logging.getLogger("nanoflow_jax")

CPU_KV_BYTES = 1 << 30  # KV budget where the backend reports no memory (the CPU)
CPU_MAX_NUM_SEQS = 256  # running sequences there when max_num_seqs is None


_bytes = device_memory.format_bytes


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
        device_memory.reserve_if_not_started(config.gpu_memory_utilization)
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
        self.max_pages = -(-self.max_model_len // config.page_size)
        self.kv_dtype = jnp.dtype(config.dtype)
        # Per device (a tensor-parallel device holds its shard of the weights and KV heads).
        self.page_bytes = page_bytes(mc, config.page_size, self.kv_dtype,
                                     config.tensor_parallel_size)
        self.weight_bytes = sum(device_memory.bytes_per_device(x)
                                for x in jax.tree.leaves(self.params))
        memory = device_memory.device_memory()  # None: no memory pool (the CPU)
        self.budget = (None if memory is None else
                       device_memory.memory_budget(config.gpu_memory_utilization, memory))
        self.max_decode = self._decode_rows(self._room_without_programs(memory))
        self.max_num_seqs = config.max_num_seqs or self.max_decode  # running sequences
        self.num_rows = self.max_decode + config.max_prefill_seqs
        self.buckets = config.token_buckets()
        # Before the KV cache: `auto` may profile the ops on the device first.
        self.schedule = named_schedule(config.schedule, config.max_num_batched_tokens,
                                       model_config=mc, dtype=config.dtype)
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
        # The samples (the next step's prev_tokens) on every device of the mesh: the model step
        # is compiled for them there.
        replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        self._sample = jax.jit(functools.partial(_sample_rows, num_rows=self.num_rows),
                               static_argnames="mode", out_shardings=replicated)
        self._prev_tokens = jax.device_put(jnp.zeros((self.num_rows,), jnp.int32), replicated)
        self.compile_time = 0.0
        self._samplers = {}  # {(rows, mode): executable}, compiled after a model step
        self._forwards, self.memory_plan = self._size_kv_cache()  # {T: executable}
        self.num_pages = self.memory_plan.num_pages
        t0 = time.perf_counter()
        self.kv = init_kv_cache(mc, self.num_pages, config.page_size, self.kv_dtype, self.mesh)
        self.kv_time = time.perf_counter() - t0
        if self.budget is not None:
            for line in self.memory_plan.log_lines(config.page_size):
                log.info("%s", line)
        log.info("KV cache: %d pages of %d tokens = %d tokens (%.2f GiB); %.1f sequences of "
                 "max_model_len=%d; up to %d running sequences (%s)", self.num_pages,
                 config.page_size, self.num_pages * config.page_size,
                 self.num_pages * self.page_bytes / 2**30, self.num_pages / self.max_pages,
                 self.max_model_len, self.max_num_seqs,
                 "max_num_seqs" if config.max_num_seqs else "what the KV cache and the dense "
                 "batch allow")
        self._check_free_block()

    # ---- memory: what the programs need, and the KV cache from what is left ----------------
    #
    # Every program the engine runs is compiled before the KV cache exists, so its workspace
    # is known when the cache is sized. The samplers do not see the cache: they are compiled
    # at their real shapes and kept. The model step takes the cache as a donated argument,
    # so its executable is specific to the page count: sizing compiles every bucket at a
    # placeholder of `max_pages` pages, and the largest bucket also at twice that, only to
    # read memory_analysis(). The cache is updated in place (donated, aliased to the
    # output) and attention gathers pages through the page table, so the step's workspace
    # does not depend on the page count; the second placeholder measures that and, should a
    # copy of the cache ever appear, its growth per page is charged to every page. Then the
    # steps are compiled once more at the real page count (the executables warm-up and
    # serving use) and checked against the plan.

    def _room_without_programs(self, memory) -> int | None:
        """KV pages the budget holds before any workspace (None: no budget): an upper bound
        that fails a configuration before anything is compiled."""
        if self.budget is None:
            return None
        cfg = self.config
        upper = device_memory.pages_that_fit(self.budget, memory.in_use, 0, 0,
                                             device_memory.SAFETY_MARGIN_BYTES, self.page_bytes)
        if cfg.num_pages is not None and cfg.num_pages > upper:
            raise self._num_pages_error(0)
        if upper < self.max_pages:
            raise self._no_room(upper, 0, "not measured yet")
        return upper

    def _decode_rows(self, room: int | None) -> int:
        """Decode rows of the compiled step (also the running-sequence cap when max_num_seqs
        is None): never more than the dense batch; else max_num_seqs, or the sequences the
        KV cache can hold at one page each: num_pages, `room` (the budget's pages before any
        workspace: the sampler's grows with the rows, so it is measured with them), or
        CPU_MAX_NUM_SEQS where there is no budget."""
        cfg = self.config
        if cfg.max_num_seqs is not None:
            capacity = cfg.max_num_seqs
        elif cfg.num_pages is not None:
            capacity = cfg.num_pages
        else:
            capacity = CPU_MAX_NUM_SEQS if room is None else room
        return max(1, min(cfg.max_num_batched_tokens, capacity))

    def _no_room(self, num_pages: int, workspace: int, program: str) -> ValueError:
        """The one-line error of a budget that cannot hold one sequence of max_model_len."""
        cfg = self.config
        return ValueError(
            f"gpu_memory_utilization={cfg.gpu_memory_utilization:g} leaves room for {num_pages} "
            f"KV pages but one sequence of max_model_len={self.max_model_len} needs "
            f"{self.max_pages}: raise gpu_memory_utilization or lower max_model_len (budget "
            f"{_bytes(self.budget)}: weights {_bytes(self.weight_bytes)}, workspace "
            f"{_bytes(workspace)} ({program}), safety margin "
            f"{_bytes(device_memory.SAFETY_MARGIN_BYTES)})")

    def _cpu_pages(self) -> int:
        """KV pages where the backend reports no memory: a fixed budget, and no more than
        max_num_seqs (or CPU_MAX_NUM_SEQS) sequences of max_model_len."""
        seqs = self.config.max_num_seqs or CPU_MAX_NUM_SEQS
        return max(1, min(CPU_KV_BYTES // self.page_bytes, seqs * self.max_pages))

    def _compile_samplers(self, step) -> dict:
        """The sampler for each number of sampled rows the buckets have, in every mode, for the
        logits of the compiled model step `step` (its dtype and sharding)."""
        t0 = time.perf_counter()
        out = {}
        logits_sharding = step.output_shardings[0]
        for rows in sorted({self.shape_for(t).num_logits for t in self.buckets}):
            # llama.forward's logits: fp32 [rows, V]
            logits = jax.ShapeDtypeStruct((rows, self.model_config.vocab_size), jnp.float32,
                                          sharding=logits_sharding)
            sampling = sampling_tensors([], [], [], pad_to=rows)
            for mode in SampleMode.all():
                out[rows, mode] = self._sample.lower(logits, sampling, mode=mode).compile()
        self.compile_time += time.perf_counter() - t0
        return out

    def _compile_forwards(self, num_pages: int, buckets=None) -> dict:
        """The model step of each bucket for a KV cache of `num_pages` pages (its shape only:
        nothing is allocated)."""
        t0 = time.perf_counter()
        kv = kv_cache_spec(self.model_config, num_pages, self.config.page_size, self.kv_dtype,
                           self.mesh)
        out = {}
        buckets = buckets or self.buckets
        # Compiling is most of a start-up (minutes for an 8B model on a GPU): show it.
        for t in tqdm(buckets, desc=f"compiling the model step, {len(buckets)} buckets",
                      unit="bucket", leave=False, dynamic_ncols=True):
            batch = build_batch([], [], self.shape_for(t), self.config.page_size)
            out[t] = self._forward.lower(self.params, kv, batch, self._prev_tokens).compile()
        self.compile_time += time.perf_counter() - t0
        return out

    def _forward_memory(self, forwards: dict, num_pages: int) -> list[ProgramMemory]:
        resident = self.weight_bytes + num_pages * self.page_bytes  # read, not allocated
        mc, t_max = self.model_config, self.config.max_num_batched_tokens
        widest = max(mc.hidden_size, mc.q_size + 2 * mc.kv_size, 2 * mc.intermediate_size)
        out = []
        for t, compiled in forwards.items():
            p = program_memory(f"model step T={t}", compiled, resident)
            if not p.known:  # no analysis from this backend: a generous estimate
                p = dataclasses.replace(p, temp=8 * t_max * widest * self.kv_dtype.itemsize
                                        + 4 * self.num_rows * mc.vocab_size * 4)
            out.append(p)
        return out

    def _sampler_memory(self) -> list[ProgramMemory]:
        out = []
        for (rows, mode), compiled in self._samplers.items():
            parts = [n for n, on in (("draw", mode.sampled), ("filter", mode.filtered),
                                     ("logprobs", mode.logprobs)) if on]
            p = program_memory(f"sampler rows={rows} ({'+'.join(parts) or 'greedy'})",
                               compiled)
            if not p.known:
                p = dataclasses.replace(p, temp=8 * rows * self.model_config.vocab_size * 4)
            out.append(p)
        return out

    def _live_bytes(self) -> int:
        """Device buffers outside any running program: the samples of two steps (one being
        read, one the next step's prev_tokens) and the next step's inputs."""
        samples = self.num_rows * (8 + 8 * MAX_LOGPROBS)  # SampleOutput, 4-byte leaves
        shape = self.shape_for(self.buckets[-1])
        batch = build_batch([], [], shape, self.config.page_size)
        sampling = sampling_tensors([], [], [], pad_to=self.num_rows)
        inputs = sum(x.nbytes for x in jax.tree.leaves((batch, sampling)))
        return 2 * samples + inputs

    def _size_kv_cache(self):
        """-> (the model step's executables, MemoryPlan): num_pages as given, a fixed size
        where there is no budget (the CPU), else what the budget leaves."""
        cfg = self.config
        if cfg.num_pages is None and self.budget is not None:
            num_pages, plan = self._pages_from_budget()
        else:
            num_pages, plan = cfg.num_pages or self._cpu_pages(), None
            if num_pages < self.max_pages:
                raise ValueError(
                    f"the KV cache holds {num_pages} pages ({num_pages * cfg.page_size} tokens)"
                    f" but one sequence of max_model_len={self.max_model_len} needs "
                    f"{self.max_pages}: lower max_model_len or raise num_pages")
        forwards = self._compile_forwards(num_pages)
        if not self._samplers:
            self._samplers = self._compile_samplers(forwards[self.buckets[-1]])
        measured = self._plan(self._forward_memory(forwards, num_pages) + self._sampler_memory(),
                              num_pages)
        if plan is None:
            plan = measured
            if plan.unplanned is not None and plan.unplanned < 0:
                raise self._num_pages_error(plan.workspace)
        elif measured.workspace > plan.workspace:
            log.warning("the model steps compiled for %d pages need %s of workspace, %s more "
                        "than planned (the safety margin absorbs up to %s)", num_pages,
                        _bytes(measured.workspace), _bytes(measured.workspace - plan.workspace),
                        _bytes(plan.margin))
        self.programs = measured.programs
        return forwards, plan

    def _num_pages_error(self, workspace: int) -> ValueError:
        """The one-line error of a num_pages that the budget cannot hold."""
        cfg = self.config
        return ValueError(
            f"num_pages={cfg.num_pages} ({_bytes(cfg.num_pages * self.page_bytes)} of KV cache) "
            f"does not fit the {_bytes(self.budget)} budget of gpu_memory_utilization="
            f"{cfg.gpu_memory_utilization:g} with weights {_bytes(self.weight_bytes)} and "
            f"workspace {_bytes(workspace)}: lower num_pages (or leave it unset)")

    def _pages_from_budget(self) -> tuple[int, MemoryPlan]:
        """KV pages from what the budget leaves after the weights (and every other live
        buffer), the largest program's workspace, the step buffers and a safety margin."""
        t0 = time.perf_counter()
        lo, hi = self.max_pages, 2 * self.max_pages  # placeholder page counts
        probes = self._compile_forwards(lo)
        self._samplers = self._compile_samplers(probes[self.buckets[-1]])
        steps = self._forward_memory(probes, lo)
        del probes
        largest_hi = self._forward_memory(self._compile_forwards(hi, [self.buckets[-1]]), hi)[0]
        # Workspace that comes with each page: 0 while the cache is updated in place.
        growth = max(0, -(-(largest_hi.workspace - steps[-1].workspace) // (hi - lo)))
        if growth:
            log.warning("the model step's workspace grows by %d bytes per KV page: XLA copies "
                        "the cache inside the step", growth)
        log.info("memory analysis: %d model steps compiled at placeholder page counts in %.1fs",
                 len(steps) + 1, time.perf_counter() - t0)
        samplers = self._sampler_memory()
        unknown = [p.name for p in steps + samplers if not p.known]
        if unknown:
            log.warning("no memory analysis for %d programs (%s, ...): their workspace is "
                        "estimated", len(unknown), unknown[0])
        in_use = device_memory.device_memory().in_use
        live, margin = self._live_bytes(), device_memory.SAFETY_MARGIN_BYTES
        num_pages = min(  # the model steps' workspace (which may grow per page), the samplers'
            device_memory.pages_that_fit(
                self.budget, in_use, max(p.workspace - growth * lo for p in steps), live,
                margin, self.page_bytes + growth),
            device_memory.pages_that_fit(
                self.budget, in_use, max(p.workspace for p in samplers), live, margin,
                self.page_bytes))
        steps = [dataclasses.replace(p, temp=p.temp + growth * (num_pages - lo)) for p in steps]
        plan = self._plan(steps + samplers, num_pages, in_use)
        if num_pages < self.max_pages:
            raise self._no_room(num_pages, plan.workspace, plan.workspace_program)
        return num_pages, plan

    def _plan(self, programs: list[ProgramMemory], num_pages: int,
              in_use: int | None = None) -> MemoryPlan:
        largest = max(programs, key=lambda p: p.workspace)
        if in_use is None:
            memory = device_memory.device_memory()
            in_use = self.weight_bytes if memory is None else memory.in_use
        return MemoryPlan(
            total=None if self.budget is None else device_memory.device_memory().total,
            fraction=self.config.gpu_memory_utilization, budget=self.budget,
            weights=self.weight_bytes, in_use=in_use, workspace=largest.workspace,
            workspace_program=largest.name, live=self._live_bytes(),
            margin=device_memory.SAFETY_MARGIN_BYTES, page_bytes=self.page_bytes,
            num_pages=num_pages, programs=tuple(programs))

    def _check_free_block(self) -> None:
        """Warn when no free block can hold the largest program's scratch buffer (XLA gives a
        program one contiguous temp allocation): the pool is fragmented."""
        memory = device_memory.device_memory()
        temp = max(p.temp for p in self.programs)
        if memory is not None and memory.largest_free_block is not None \
                and memory.largest_free_block < temp:
            log.warning("after the KV cache the largest free block is %s but a program needs "
                        "%s of scratch: lower gpu_memory_utilization if a step runs out of "
                        "memory", _bytes(memory.largest_free_block), _bytes(temp))

    def shape_for(self, num_tokens: int) -> BatchShape:
        t = next((b for b in self.buckets if b >= num_tokens), None)
        if t is None:
            raise ValueError(f"{num_tokens} tokens exceed the dense batch {self.buckets[-1]}")
        return BatchShape(num_tokens=t, num_decode=min(self.max_decode, t),
                          num_prefill_seqs=min(self.config.max_prefill_seqs, t),
                          max_pages=self.max_pages)

    @property
    def num_compiled(self) -> int:
        """Programs held for the step: the model's and the sampler's executables, plus any the
        jitted functions compiled on a call (none: a test checks this does not grow)."""
        return (len(self._forwards) + len(self._samplers) + self._forward._cache_size()
                + self._sample._cache_size())

    def warmup(self) -> None:
        """Run the model of every bucket and its sampler in every mode once (all compiled at
        start-up; this first run also allocates each program's scratch memory)."""
        t0 = time.perf_counter()
        try:
            for t in self.buckets:
                shape = self.shape_for(t)
                batch = build_batch([], [], shape, self.config.page_size)
                sampling = sampling_tensors([], [], [], pad_to=shape.num_logits)
                for mode in SampleMode.all():
                    jax.block_until_ready(self.run_step(batch, sampling, mode))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise RuntimeError(
                f"the device ran out of memory in warm-up with a KV cache of {self.num_pages} "
                f"pages: lower gpu_memory_utilization (now "
                f"{self.config.gpu_memory_utilization:g}) or set num_pages below that") from e
        self.compile_time += time.perf_counter() - t0
        log.info("compiled %d buckets %s and warmed up in %.1fs", len(self.buckets),
                 self.buckets, self.compile_time)

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
        forward = self._forwards.get(batch.token_ids.shape[0], self._forward)
        logits, self.kv = forward(self.params, self.kv, batch, self._prev_tokens)
        sample = self._samplers.get((logits.shape[0], mode))
        samples = (sample(logits, sampling) if sample is not None
                   else self._sample(logits, sampling, mode=mode))
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

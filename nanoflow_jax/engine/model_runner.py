"""The device side of the engine: weights, the KV cache, and one compiled step per bucket.

A step is two programs: `_forward(params, kv, batch, prev_tokens) -> (hidden, kv)` runs
embed → layers → the hidden states of the rows that may be sampled, with the KV cache donated
(updated in place), and `_sample_rows(head, hidden, sampling, mode)` applies the final norm
and LM head to the rows the step uses and samples them on the device. The sampler is compiled
once per `SampleMode` (what the batch's rows need, known on the host) and per row count (the
buckets' `num_logits`): a step with 356 decodes in the 1024-token bucket computes the logits
of 528 rows, not of the bucket's 1040: about half the LM head of a 128k vocabulary. Neither
program holds a device-side branch that would make the host wait. All are compiled at
start-up, before the KV cache is allocated (the independent ones at once, `CompilePool`): the
cache gets what the memory budget leaves after the weights and the largest program's
workspace (`_size_kv_cache`). The runner is asynchronous: `dispatch` enqueues a step and
returns at once with device arrays; a decode whose input token is still being sampled by the
previous step names that step's sample row (`future_rows`), and the step reads it from
`prev_tokens` on the device.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from nanoflow_jax import device_memory, parallel
from nanoflow_jax.batch import BatchShape, DecodeRows, SeqChunk, build_batch
from nanoflow_jax.config import EngineConfig, ModelConfig
from nanoflow_jax.device_memory import MemoryPlan, ProgramMemory, program_memory
from nanoflow_jax.engine.sampler import SampleMode, SampleOutput, sample, sampling_tensors
from nanoflow_jax.engine.scheduler import Chunk, SchedulerOutput
from nanoflow_jax.engine.sequence import PENDING, Sequence
from nanoflow_jax.kv_cache import PageTable, init_kv_cache, kv_cache_spec, page_bytes
from nanoflow_jax.model_loader import load_model
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.guard import engine_timer
from nanoflow_jax.pipeline.schedule import sequential
from nanoflow_jax.pipeline.spec import named_schedule
from nanoflow_jax.sampling_params import MAX_LOGPROBS

log = logging.getLogger("nanoflow_jax")

CPU_KV_BYTES = 1 << 30  # KV budget where the backend reports no memory (the CPU)
CPU_MAX_NUM_SEQS = 256  # running sequences there when max_num_seqs is None
MAX_REPLANS = 3  # KV cache re-sizings after the steps measure more workspace than planned


_bytes = device_memory.format_bytes


def _forward(params, kv, batch, prev_tokens, *, config, attention, layers_fn, num_rows,
             forward=llama.forward):
    """One iteration's model on the device -> (hidden [num_rows, D], kv): the hidden states
    of the bucket's num_logits rows, zero-padded to num_rows so that every bucket's sampler
    takes one shape. prev_tokens [num_rows]: the previous step's samples. `forward`:
    llama.forward or its tensor-parallel version (`parallel.forward_fn`)."""
    future = batch.future_rows
    token_ids = jnp.where(future >= 0, prev_tokens[jnp.maximum(future, 0)], batch.token_ids)
    hidden, kv = forward(params, config, token_ids, batch.positions, kv, batch.attn,
                         batch.logits_indices, attention, layers_fn, head=False)
    return jnp.pad(hidden, [(0, num_rows - hidden.shape[0]), (0, 0)]), kv


def _sample_rows(head, hidden, sampling, *, config, mode, num_rows):
    """The LM head and the sampler over the first R rows of `hidden` [num_rows, D], R the
    sampling tensors' rows -> SampleOutput [num_rows]. head: the parameters compute_logits
    reads; on a mesh the logits come out sharded as the head is (by vocab)."""
    rows = sampling.temperature.shape[0]
    logits = llama.compute_logits(head, hidden[:rows], config)  # fp32 [R, V]
    out = sample(logits, sampling, MAX_LOGPROBS, mode)
    # Every row count returns num_rows rows, so the next step's prev_tokens has one shape.
    pad = num_rows - rows
    return jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), out)


@dataclasses.dataclass
class InFlight:
    """A dispatched step: its device samples and which sequence owns which sample row."""

    samples: SampleOutput  # device arrays, [num_rows]
    owners: list[tuple[Sequence, int, int]]  # (sequence, index in its output, sample row)
    build_s: float  # host time to build the batch and sampling tensors
    launch_s: float  # the jitted call: returns once the step is enqueued on the device


def compile_lowered(lowered):
    """XLA's compile of one lowered program (tests wrap it to count compiles)."""
    return lowered.compile()


class CompilePool:
    """Compiles lowered programs in a thread pool: XLA's compile releases the GIL, so the
    independent programs of one stage (every bucket's model step; the samplers) compile at
    the same time. Lowering (tracing) stays in the calling thread, each program submitted as
    soon as it is lowered. A progress bar counts the compiled programs."""

    def __init__(self, desc: str, total: int):
        self._executor = ThreadPoolExecutor(max(1, min(total, os.cpu_count() or 1)),
                                            thread_name_prefix="compile")
        # Compiling is most of a start-up (a minute for an 8B model on a GPU): show it.
        self._bar = tqdm(total=total, desc=desc, unit="program", leave=False,
                         dynamic_ncols=True)
        self._futures = {}

    def submit(self, key, lowered) -> None:
        future = self._executor.submit(compile_lowered, lowered)
        future.add_done_callback(lambda _: self._bar.update(1))
        self._futures[key] = future

    def result(self, key):
        return self._futures[key].result()

    def results(self) -> dict:
        return {key: future.result() for key, future in self._futures.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._bar.close()


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self._t_start = t0 = time.perf_counter()
        device_memory.reserve_if_not_started(config.gpu_memory_utilization)
        config = config.for_backend(jax.default_backend())
        self.config = config
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
                                       model_config=mc, dtype=config.dtype,
                                       tensor_parallel_size=config.tensor_parallel_size,
                                       measure=engine_timer(config, self.params, mc))
        on_gpu = jax.default_backend() == "gpu"

        def step_fn(schedule):
            layers_fn = (llama.run_layers if schedule.is_sequential
                         else make_layers_fn(schedule))
            return jax.jit(
                functools.partial(_forward, config=mc,
                                  attention=attention_fn(config.attention_impl),
                                  layers_fn=layers_fn, num_rows=self.num_rows,
                                  forward=parallel.forward_fn(self.mesh)),
                donate_argnums=(1,),
                compiler_options={**schedule.compiler_options(),
                                  **parallel.compiler_options(self.mesh, schedule)}
                if on_gpu else None,
            )

        self._forward = step_fn(self.schedule)
        # The memory probe's step (below): an in-SM schedule's step compiles a Mosaic GPU kernel
        # per layer (~60 s), so the probe takes the sequential step; should the real one need
        # more workspace, the cache is re-planned as for any step.
        self._probe_forward = (step_fn(sequential(config.max_num_batched_tokens))
                               if self.schedule.in_sm_rows else self._forward)
        # The samples (the next step's prev_tokens) on every device of the mesh: the model step
        # is compiled for them there.
        replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        self._sample = jax.jit(functools.partial(_sample_rows, config=mc, num_rows=self.num_rows),
                               static_argnames="mode", out_shardings=replicated)
        # What llama.compute_logits reads: the final norm and the head (the embedding if tied).
        self._head = {k: self.params[k] for k in
                      ("final_norm", "embed" if mc.tie_word_embeddings else "lm_head")}
        # The step's hidden states: replicated on a mesh (summed over the shards).
        self._hidden = jax.ShapeDtypeStruct((self.num_rows, mc.hidden_size),
                                            self.params["embed"].dtype, sharding=replicated)
        self._prev_tokens = jax.device_put(jnp.zeros((self.num_rows,), jnp.int32), replicated)
        # Start-up times (s), logged by warmup(): the memory probes, compiling the programs
        # that serve (any re-plan included), the KV cache's allocation, the warm-up.
        self.probe_time = self.compile_time = self.kv_time = self.warmup_time = 0.0
        self.startup_time = 0.0  # all of it, from here to the end of warmup()
        self.replans = 0  # times the KV cache was re-sized after the steps were compiled
        self._samplers = {}  # {(rows, mode): executable}
        # The numbers of sampled rows the buckets have (one sampler per count and mode).
        self._row_counts = sorted({self.shape_for(t).num_logits for t in self.buckets})
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
    # so its executable is specific to the page count. One probe, the largest bucket's step
    # compiled for a placeholder of `max_pages` pages, gives the steps' workspace: the cache
    # is updated in place (donated, aliased to the output) and attention gathers pages
    # through the page table, so the workspace does not depend on the page count, and the
    # largest bucket has the most rows. The cache takes what that leaves; then every bucket
    # is compiled once for the real page count (the executables warm-up and serving use)
    # and checked against the plan. Should a step need more than planned (a smaller bucket
    # with more scratch, or a copy of the cache: the largest bucket at the two page counts
    # measures its growth per page), the cache is re-sized from what the steps measure and
    # they are compiled again, before anything is allocated. An in-SM schedule's probe is the
    # sequential step (`_probe_forward`): its own compiles for a minute.

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

    def rows_for(self, used: int, shape: BatchShape) -> int:
        """The sampler's row count for a step of `shape` whose first `used` rows are sampled:
        the fewest of the buckets' counts that holds them."""
        return next(r for r in self._row_counts if r >= min(used, shape.num_logits))

    def _compile(self, num_pages: int, buckets, samplers: bool, desc: str, forward=None):
        """-> ({T: model step}, {(rows, mode): sampler}): the model step of each bucket in
        `buckets` for a KV cache of `num_pages` pages (its shape only: nothing is allocated),
        and with `samplers` the sampler for each number of sampled rows in every mode, all
        compiled at once (`CompilePool`). `forward`: the jitted step (None: the serving one)."""
        kv = kv_cache_spec(self.model_config, num_pages, self.config.page_size, self.kv_dtype,
                           self.mesh)
        rows = self._row_counts if samplers else []
        buckets = sorted(buckets, reverse=True)  # the longest compile starts first
        with CompilePool(desc, len(buckets) + len(rows) * len(SampleMode.all())) as pool:
            for t in buckets:
                batch = build_batch([], [], self.shape_for(t), self.config.page_size)
                pool.submit(("step", t), (forward or self._forward).lower(
                    self.params, kv, batch, self._prev_tokens))
            for r in rows:
                sampling = sampling_tensors([], [], [], pad_to=r)
                for mode in SampleMode.all():
                    pool.submit(("sampler", r, mode),
                                self._sample.lower(self._head, self._hidden, sampling, mode=mode))
            done = pool.results()
        forwards = {key[1]: done[key] for key in sorted(k for k in done if k[0] == "step")}
        return forwards, {key[1:]: c for key, c in done.items() if key[0] == "sampler"}

    def _forward_memory(self, forwards: dict, num_pages: int) -> list[ProgramMemory]:
        resident = self.weight_bytes + num_pages * self.page_bytes  # read, not allocated
        mc, t_max = self.model_config, self.config.max_num_batched_tokens
        widest = max(mc.hidden_size, mc.q_size + 2 * mc.kv_size, 2 * mc.intermediate_size)
        out = []
        for t, compiled in forwards.items():
            p = program_memory(f"model step T={t}", compiled, resident)
            if not p.known:  # no analysis from this backend: a generous estimate
                p = dataclasses.replace(p, temp=8 * t_max * widest * self.kv_dtype.itemsize)
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
            return self._compile_for_budget(*self._probe_workspace())
        num_pages = cfg.num_pages or self._cpu_pages()
        if num_pages < self.max_pages:
            raise ValueError(
                f"the KV cache holds {num_pages} pages ({num_pages * cfg.page_size} tokens)"
                f" but one sequence of max_model_len={self.max_model_len} needs "
                f"{self.max_pages}: lower max_model_len or raise num_pages")
        t0 = time.perf_counter()
        forwards, self._samplers = self._compile(
            num_pages, self.buckets, samplers=True,
            desc=f"compiling {len(self.buckets)} model steps and the samplers")
        self.compile_time = time.perf_counter() - t0
        plan = self._plan(self._forward_memory(forwards, num_pages) + self._sampler_memory(),
                          num_pages)
        if plan.unplanned is not None and plan.unplanned < 0:
            raise self._num_pages_error(plan.workspace)
        self.programs = plan.programs
        return forwards, plan

    def _num_pages_error(self, workspace: int) -> ValueError:
        """The one-line error of a num_pages that the budget cannot hold."""
        cfg = self.config
        return ValueError(
            f"num_pages={cfg.num_pages} ({_bytes(cfg.num_pages * self.page_bytes)} of KV cache) "
            f"does not fit the {_bytes(self.budget)} budget of gpu_memory_utilization="
            f"{cfg.gpu_memory_utilization:g} with weights {_bytes(self.weight_bytes)} and "
            f"workspace {_bytes(workspace)}: lower num_pages (or leave it unset)")

    def _fit(self, steps: list[ProgramMemory], steps_pages: int, growth: int,
             in_use: int) -> int:
        """KV pages the budget holds beside the model steps `steps` (compiled for
        `steps_pages` pages, growing by `growth` bytes per page) and the samplers."""
        return device_memory.pages_beside_programs(
            self.budget, in_use, self._live_bytes(), device_memory.SAFETY_MARGIN_BYTES,
            self.page_bytes, steps, steps_pages, growth, self._sampler_memory())

    def _probe_workspace(self) -> tuple[MemoryPlan, ProgramMemory]:
        """-> (the plan, the probe): KV pages from what the budget leaves after the weights
        (and every other live buffer), the largest program's workspace, the step buffers and
        a safety margin, measured on the largest bucket's model step compiled for a
        placeholder of max_pages pages (the probe) and on the samplers (compiled at their
        real shapes and kept)."""
        t0 = time.perf_counter()
        lo = self.max_pages
        probe, self._samplers = self._compile(
            lo, self.buckets[-1:], samplers=True, forward=self._probe_forward,
            desc="measuring the workspace: the largest model step and the samplers")
        steps = self._forward_memory(probe, lo)
        del probe
        samplers = self._sampler_memory()
        unknown = [p.name for p in steps + samplers if not p.known]
        if unknown:
            log.warning("no memory analysis for %d programs (%s, ...): their workspace is "
                        "estimated", len(unknown), unknown[0])
        in_use = device_memory.device_memory().in_use
        num_pages = self._fit(steps, lo, 0, in_use)
        plan = self._plan(steps + samplers, num_pages, in_use)
        self.probe_time = time.perf_counter() - t0
        log.info("memory probes: the largest model step (at a placeholder of %d pages) and "
                 "%d samplers compiled in %.1fs", lo, len(samplers), self.probe_time)
        if num_pages < self.max_pages:
            raise self._no_room(num_pages, plan.workspace, plan.workspace_program)
        return plan, steps[0]

    def _compile_for_budget(self, plan: MemoryPlan, probe: ProgramMemory):
        """-> (the model step's executables, MemoryPlan): every bucket compiled for the planned
        page count and checked against the plan. Steps that need more workspace than planned
        (a smaller bucket's larger scratch, or a workspace that grows with the cache) beyond
        REPLAN_TOLERANCE_BYTES re-size the cache from what they measure and compile again."""
        num_pages, in_use, planned, growth = plan.num_pages, plan.in_use, plan.workspace, 0
        t0 = time.perf_counter()
        while True:
            forwards, _ = self._compile(
                num_pages, self.buckets, samplers=False,
                desc=f"compiling the model step, {len(self.buckets)} buckets")
            steps = self._forward_memory(forwards, num_pages)
            measured = self._plan(steps + self._sampler_memory(), num_pages, in_use)
            excess = measured.workspace - planned
            if measured.unplanned >= -device_memory.REPLAN_TOLERANCE_BYTES:
                break
            if self.replans == MAX_REPLANS:
                raise ValueError(
                    f"the model steps compiled for {num_pages} KV pages still need "
                    f"{_bytes(excess)} more workspace than planned after {MAX_REPLANS} "
                    f"re-plans: set num_pages or lower gpu_memory_utilization (now "
                    f"{self.config.gpu_memory_utilization:g})")
            # The largest bucket at the probe's page count and at this one: its workspace
            # per page (0 while the cache is updated in place), charged to every bucket
            # (unknown when the probe was another schedule's step).
            if self._probe_forward is self._forward:
                growth = max(growth, device_memory.growth_per_page(
                    probe.workspace, self.max_pages, steps[-1].workspace, num_pages))
            fitted = self._fit(steps, num_pages, growth, in_use)
            log.warning(
                "re-planning the KV cache: the model steps compiled for %d pages need %s of "
                "workspace (%s), %s more than planned%s; recompiling them for %d pages",
                num_pages, _bytes(measured.workspace), measured.workspace_program,
                _bytes(excess), f", growing by {growth} bytes per page (XLA copies the cache "
                "inside the step)" if growth else "", fitted)
            if fitted < self.max_pages:
                raise self._no_room(fitted, measured.workspace, measured.workspace_program)
            self.replans += 1
            planned = max([p.workspace + growth * (fitted - num_pages) for p in steps]
                          + [p.workspace for p in self._sampler_memory()])
            num_pages = fitted
        if excess > 0:
            log.warning("the model steps compiled for %d pages need %s of workspace, %s more "
                        "than planned (the safety margin absorbs up to %s)", num_pages,
                        _bytes(measured.workspace), _bytes(excess),
                        _bytes(device_memory.REPLAN_TOLERANCE_BYTES))
        self.compile_time = time.perf_counter() - t0
        self.programs = measured.programs
        return forwards, measured

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
        start-up; this first run also allocates each program's scratch memory), then log the
        start-up's times."""
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
        self.warmup_time = time.perf_counter() - t0
        self.startup_time = time.perf_counter() - self._t_start
        log.info("%s", self.startup_line())

    def startup_line(self) -> str:
        """Where the start-up went (after warmup()): the parts and the rest (choosing the
        schedule, building the jitted functions)."""
        parts = (self.load_time, self.probe_time, self.compile_time, self.kv_time,
                 self.warmup_time)
        replans = f", {self.replans} re-plans" if self.replans else ""
        return (f"start-up {self.startup_time:.1f}s: weights {self.load_time:.1f}s, memory "
                f"probes {self.probe_time:.1f}s, compile {self.compile_time:.1f}s "
                f"({len(self.buckets)} buckets {list(self.buckets)} at {self.num_pages} "
                f"pages{replans}), KV alloc {self.kv_time:.1f}s, warm-up "
                f"{self.warmup_time:.1f}s, other {self.startup_time - sum(parts):.1f}s")

    def run_step(self, batch, sampling, mode: SampleMode) -> SampleOutput:
        """Enqueue the model and the sampler on a built batch; the samples become the next
        step's prev_tokens. The sampling tensors' rows (one of the buckets' num_logits) say
        how many of the step's rows get logits."""
        forward = self._forwards.get(batch.token_ids.shape[0], self._forward)
        hidden, self.kv = forward(self.params, self.kv, batch, self._prev_tokens)
        sample = self._samplers.get((sampling.temperature.shape[0], mode))
        samples = (sample(self._head, hidden, sampling) if sample is not None
                   else self._sample(self._head, hidden, sampling, mode=mode))
        self._prev_tokens = samples.token_ids
        return samples

    def dispatch(self, sched: SchedulerOutput, page_table: PageTable,
                 shape: BatchShape | None = None) -> InFlight:
        """Enqueue one step on the device; returns without waiting for it. `page_table`: the
        scheduler's, holding each scheduled sequence's pages at its `page_row`."""
        t0 = time.perf_counter()
        shape = shape or self.shape_for(sched.num_tokens)
        # Sample rows: decode i -> row i; prompt chunk j -> row (decodes) + j. The token sampled
        # for a sequence is its last output (PENDING since the scheduler appended it).
        nd = len(sched.decodes)
        owners = [(c.seq, len(c.seq.output_token_ids) - 1, i)
                  for i, c in enumerate(sched.decodes)]
        owners += [(c.seq, len(c.seq.output_token_ids) - 1, nd + j)
                   for j, c in enumerate(sched.prefills) if c.samples]
        batch = build_batch(_decode_rows(sched.decodes, page_table, shape),
                            [_prefill_chunk(c, page_table) for c in sched.prefills], shape,
                            self.config.page_size)
        params = [s.params for s, _, _ in owners]
        sampling = sampling_tensors(params, [s.seed for s, _, _ in owners],
                                    [i for _, i, _ in owners],
                                    pad_to=self.rows_for(nd + len(sched.prefills), shape),
                                    rows=[r for _, _, r in owners])
        mode = SampleMode.of(params)
        for seq, _, row in owners:  # after _decode_rows read the previous step's rows
            seq.sample_row = row
        t1 = time.perf_counter()
        samples = self.run_step(batch, sampling, mode)
        return InFlight(samples, owners, t1 - t0, time.perf_counter() - t1)


def _decode_rows(chunks: list[Chunk], page_table: PageTable, shape: BatchShape) -> DecodeRows:
    """The decodes as columns, their page tables gathered from `page_table`. A decode whose
    input is still being sampled (PENDING) reads it from its sample row of the previous step."""
    n = len(chunks)
    seqs = [c.seq for c in chunks]
    token_ids = np.fromiter((c.seq.token_at(c.start) for c in chunks), np.int32, n)
    pending = token_ids == PENDING
    future_rows = np.where(pending, np.fromiter((s.sample_row for s in seqs), np.int32, n), -1)
    if (future_rows[pending] < 0).any():
        raise AssertionError("a pending token with no sample row")
    token_ids[pending] = 0
    rows = np.fromiter((s.page_row for s in seqs), np.intp, n)
    return DecodeRows(token_ids, future_rows.astype(np.int32),
                      np.fromiter((c.start for c in chunks), np.int32, n),
                      page_table.gather(rows, shape.num_decode, shape.max_pages),
                      page_table.num_pages[rows])


def _prefill_chunk(chunk: Chunk, page_table: PageTable) -> SeqChunk:
    seq = chunk.seq
    ids = seq.tokens(chunk.start, chunk.start + chunk.num_tokens)
    if PENDING in ids[-2:]:  # the scheduler admits or continues no sequence with one
        raise AssertionError("a pending token can only be a decode's input")
    return SeqChunk(ids, chunk.start, page_table.pages(seq.page_row))

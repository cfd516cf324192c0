"""Device memory: the engine's budget, what its compiled programs need, and the KV cache's share.

`gpu_memory_utilization` (EngineConfig) is the fraction of the device's TOTAL memory the engine
may use for weights + KV cache + the workspace of its programs. XLA serves every device buffer
from one pool (its BFC allocator) whose size is fixed when JAX starts its backend: a fraction
of the device (XLA_CLIENT_MEM_FRACTION, or its older name XLA_PYTHON_CLIENT_MEM_FRACTION;
0.75 when neither is set). So the pool must be sized before JAX starts:

    from nanoflow_jax.device_memory import reserve_device_memory
    reserve_device_memory(0.9)  # before anything touches a JAX device
    ... LLM(..., gpu_memory_utilization=0.9)

The engine's budget is then fraction × total, where total = the pool (`bytes_limit`) / the
XLA fraction in effect, capped at the pool (with a one-line warning if the pool is smaller,
e.g. when JAX started before the engine was made). Backends that report no pool (the CPU)
have no budget: the engine falls back to a fixed KV size there.

The engine (ModelRunner) splits the budget as a `MemoryPlan`:
    in use (weights and any other live array) + workspace of the largest program
    + step buffers (what outlives a program) + a fixed safety margin + KV pages,
the KV cache taking whole pages of what is left (`pages_that_fit`). A program's workspace
(`ProgramMemory`) is read from its compiled executable: XLA's scratch buffer, its outputs that
do not alias an input, and its inputs other than the weights and the KV cache. The engine
plans from a probe (the largest model step, compiled for a placeholder page count), compiles
the steps for the planned page count, and re-sizes the cache should they need more than planned
beyond REPLAN_TOLERANCE_BYTES (`pages_beside_programs`, `growth_per_page`).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax

log = logging.getLogger("nanoflow_jax")

GiB = 2**30
# The names XLA reads its pool fraction from, current first; both set is an error in JAX.
XLA_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
XLA_DEFAULT_FRACTION = 0.75  # XLA's pool when neither variable is set
# Room left unplanned inside the budget: allocator rounding and fragmentation, small
# allocations of the runtime. Everything that can be measured is measured instead.
SAFETY_MARGIN_BYTES = 512 << 20
# How far the model steps compiled at the planned page count may exceed the plan (taken from
# the safety margin, with a warning) before the KV cache is re-sized and the steps recompiled:
# most of the margin stays for what it is there for.
REPLAN_TOLERANCE_BYTES = SAFETY_MARGIN_BYTES // 4


def format_bytes(n: int) -> str:
    """Bytes for a log line, in GiB, MiB or KiB."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def backend_initialized() -> bool:
    """Whether JAX has created its backends (after which the pool size is fixed)."""
    from jax._src import xla_bridge  # no public API says this
    return xla_bridge.backends_are_initialized()


def xla_memory_fraction() -> float:
    """The fraction of the device XLA's pool was (or will be) given, from the environment."""
    for name in XLA_FRACTION_VARS:
        value = os.environ.get(name)
        if value:
            return float(value)
    return XLA_DEFAULT_FRACTION


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device's memory as XLA reports it, in bytes."""

    total: int  # the device: pool / the XLA fraction in effect
    pool: int  # XLA's pool (memory_stats' bytes_limit): no buffer can live outside it
    in_use: int  # held by live buffers now (bytes_in_use)
    largest_free_block: int | None = None  # the largest contiguous free block, if reported


def memory_stats(device) -> dict | None:
    """`device.memory_stats()` (one place for tests to substitute a device's numbers)."""
    return device.memory_stats()


def device_memory(device=None) -> DeviceMemory | None:
    """The memory of `device` (default: the first local one); None where the backend reports
    no pool (the CPU, or XLA_PYTHON_CLIENT_ALLOCATOR=platform)."""
    stats = memory_stats(device or jax.local_devices()[0]) or {}
    if "bytes_limit" not in stats:
        return None
    pool = int(stats["bytes_limit"])
    largest = stats.get("largest_free_block_bytes")
    return DeviceMemory(total=int(pool / xla_memory_fraction()), pool=pool,
                        in_use=int(stats.get("bytes_in_use", 0)),
                        largest_free_block=None if largest is None else int(largest))


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {fraction}")


def reserve_device_memory(fraction: float) -> None:
    """Size XLA's memory pool to `fraction` of each device's memory; call it before JAX starts
    its backend (before the first array, device query or jit call).

    Sets the XLA fraction variable already in the environment (else
    XLA_PYTHON_CLIENT_MEM_FRACTION, which every supported JAX reads) to `fraction`. If the
    backend is already initialised, nothing can change: a pool at least that large is fine,
    a smaller one raises RuntimeError (one line naming the variable to set). Where the backend
    has no pool (the CPU) it does nothing. `fraction` outside (0, 1] raises ValueError.
    """
    _check_fraction(fraction)
    if backend_initialized():
        mem = device_memory()
        if mem is not None and mem.pool < fraction * mem.total * (1 - 1e-3):
            raise RuntimeError(
                f"JAX already started with a memory pool of {mem.pool / GiB:.1f} GiB "
                f"({xla_memory_fraction():g} of {mem.total / GiB:.1f} GiB) but "
                f"gpu_memory_utilization={fraction:g} needs {fraction * mem.total / GiB:.1f} "
                f"GiB: call reserve_device_memory() before using JAX, or set "
                f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:g}")
        return
    present = [name for name in XLA_FRACTION_VARS if os.environ.get(name)]
    name = present[0] if present else XLA_FRACTION_VARS[1]
    for other in present[1:]:
        del os.environ[other]  # JAX refuses to start with both
    os.environ[name] = repr(float(fraction))


def reserve_if_not_started(fraction: float) -> None:
    """`reserve_device_memory(fraction)` if JAX has not started its backend yet; else nothing
    (the engine then warns if the pool is smaller than its budget). The engine calls this
    first thing, so that `LLM(...)` in a fresh process gets the pool it asks for."""
    if not backend_initialized():
        reserve_device_memory(fraction)


def memory_budget(fraction: float, mem: DeviceMemory) -> int:
    """Bytes the engine may use: fraction × the device, capped at XLA's pool (warns if so)."""
    _check_fraction(fraction)
    wanted = int(fraction * mem.total)
    if wanted > mem.pool * (1 + 1e-3):
        log.warning(
            "gpu_memory_utilization=%g asks for %s but XLA's pool holds %s (%g of the device): "
            "using the pool; call nanoflow_jax.device_memory.reserve_device_memory(%g) before "
            "JAX starts", fraction, format_bytes(wanted), format_bytes(mem.pool),
            xla_memory_fraction(), fraction)
    return min(wanted, mem.pool)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """What one compiled program needs while it runs, beyond the resident arrays (weights, KV
    cache) it reads. `known` is False where the backend gave no memory analysis."""

    name: str
    temp: int  # XLA's scratch buffer for the program (one allocation per run)
    outputs: int  # outputs that do not alias a donated input
    arguments: int  # inputs other than the resident arrays (the batch, the sampling tensors)
    known: bool = True

    @property
    def workspace(self) -> int:
        return self.temp + self.outputs + self.arguments


def program_memory(name: str, compiled, resident_bytes: int = 0) -> ProgramMemory:
    """Read `compiled.memory_analysis()`; `resident_bytes` of its arguments (weights, KV cache)
    are accounted elsewhere. Missing analysis (None, or no temp size) gives known=False."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        stats = None
    temp = getattr(stats, "temp_size_in_bytes", None)
    if temp is None or temp < 0:
        return ProgramMemory(name, 0, 0, 0, known=False)

    def size(field: str) -> int:
        return max(0, int(getattr(stats, field, 0) or 0))

    return ProgramMemory(name, int(temp), max(0, size("output_size_in_bytes")
                                              - size("alias_size_in_bytes")),
                         max(0, size("argument_size_in_bytes") - resident_bytes))


def bytes_per_device(array) -> int:
    """Bytes `array` takes on each device holding a shard of it (all of it when replicated)."""
    sharding = getattr(array, "sharding", None)
    shape = array.shape if sharding is None else sharding.shard_shape(array.shape)
    size = 1
    for n in shape:
        size *= n
    return size * array.dtype.itemsize


def pages_that_fit(budget: int, in_use: int, workspace: int, live: int, margin: int,
                   page_bytes: int) -> int:
    """Whole KV pages in what the budget leaves (0 if nothing is left)."""
    return max(0, (budget - in_use - workspace - live - margin) // page_bytes)


def growth_per_page(workspace_lo: int, pages_lo: int, workspace_hi: int, pages_hi: int) -> int:
    """Bytes of workspace a program that takes the KV cache needs per extra page, from its
    workspace measured at two page counts (rounded up; 0 for one page count or a shrink)."""
    if pages_hi == pages_lo:
        return 0
    return max(0, -(-(workspace_hi - workspace_lo) // (pages_hi - pages_lo)))


def pages_beside_programs(budget: int, in_use: int, live: int, margin: int, page_bytes: int,
                          steps: list[ProgramMemory], steps_pages: int, growth: int,
                          others: list[ProgramMemory]) -> int:
    """Whole KV pages that fit beside the largest program. `steps` (the model steps) were
    compiled for `steps_pages` pages and their workspace grows by `growth` bytes per page
    (0 while the cache is updated in place): at n pages a step needs
    workspace + growth · (n - steps_pages), so each page costs page_bytes + growth. `others`
    (the samplers) do not see the cache."""
    fixed = max(p.workspace for p in steps) - growth * steps_pages  # the steps at 0 pages
    pages = pages_that_fit(budget, in_use, fixed, live, margin, page_bytes + growth)
    if others:
        pages = min(pages, pages_that_fit(budget, in_use, max(p.workspace for p in others),
                                          live, margin, page_bytes))
    return pages


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How the engine's memory is spent, in bytes (logged at start-up). `total` and `budget`
    are None where the backend has no memory pool (the CPU)."""

    total: int | None  # the device
    fraction: float  # gpu_memory_utilization
    budget: int | None  # fraction × total, capped at XLA's pool
    weights: int
    in_use: int  # weights and every other live buffer when the cache was sized
    workspace: int  # of the largest program
    workspace_program: str  # which one
    live: int  # buffers that outlive a program: samples of steps in flight, batch inputs
    margin: int
    page_bytes: int  # one KV page, all layers
    num_pages: int
    programs: tuple[ProgramMemory, ...] = ()  # every program the engine runs

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def unplanned(self) -> int | None:
        """Budget left after everything (under a page when the cache was sized from it)."""
        if self.budget is None:
            return None
        return (self.budget - self.in_use - self.workspace - self.live - self.margin
                - self.kv_bytes)

    def log_lines(self, page_size: int) -> list[str]:
        """What was reserved for what (empty where there is no budget)."""
        if self.budget is None:
            return []
        b = format_bytes
        capped = ", capped at XLA's pool" if self.budget < int(self.fraction * self.total) else ""
        return [
            (f"memory budget {b(self.budget)}: gpu_memory_utilization={self.fraction:g} of "
             f"{b(self.total)}{capped}"),
            f"  weights {b(self.weights)} (live buffers at sizing {b(self.in_use)})",
            f"  workspace {b(self.workspace)} for the largest program, {self.workspace_program}",
            f"  step buffers {b(self.live)}, safety margin {b(self.margin)}",
            (f"  KV cache {b(self.kv_bytes)} = {self.num_pages} pages of {page_size} tokens "
             f"({b(self.page_bytes)} each); unplanned {b(self.unplanned)}"),
        ]

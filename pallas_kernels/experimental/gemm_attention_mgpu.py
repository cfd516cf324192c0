"""A GEMM and paged decode attention in one persistent kernel, both on every SM (Mosaic GPU).

Why: the GEMM is compute-bound and the decode attention memory-bound, so run side by side they
could overlap. Splitting the SMs between two kernels costs the GEMM its share of the tensor
cores (docs/overlap.md, section 3, bounds it at 1.15x per layer on an H200). Here every CTA
holds warpgroups of both: the GEMM keeps every SM's tensor cores and the attention every SM's
load path, and each side's warps run in the other's stalls.

One `plgpu.kernel` of `num_ctas` CTAs (default: one per SM), each of
`gemm_consumers + attention_consumers + 2` warpgroups:
  * GEMM consumers 0..gemm_consumers-1: c = a @ b in CTA tiles of
    [gemm_consumers * tile_m, tile_n]; consumer i computes rows i * tile_m.. of the tile with
    WGMMA into an fp32 accumulator, tile_k at a time from the ring, releasing each slot when
    its WGMMA is done (`delay_release=1`: one step later, so two WGMMAs overlap), then stores
    the tile as bf16 through shared memory with TMA, 64 columns at a time.
  * attention consumers: `decode_attention_mgpu`'s `swap_ab` consumer (the KV tokens as
    WGMMA's M, the 8 query rows of a (sequence, KV head) item as its N; its module says how).
  * the GEMM producer: TMA copies of the A [cta_m, tile_k] and B [tile_k, tile_n] tiles into a
    ring of `gemm_stages` swizzled slots.
  * the attention producer: `decode_attention_mgpu`'s, whole KV pages into a ring of
    `kv_stages` 64-token blocks, the next item's page-table row fetched ahead.
Output tiles are numbered M-fastest (tile t covers rows t % m_tiles, columns t // m_tiles), so
the CTAs at work at one time read the same few column blocks of B (the large operand: 235 MB
for up/gate) and B is read from HBM about once; A is 8 MB at 1024 tokens. Tiles and
attention items ((sequence, KV head) pairs) are both dealt round robin to the CTAs: CTA c runs
tiles c, c + num_ctas, ... and items c, c + num_ctas, ...; each role loops on its own and the
kernel ends when every role of every CTA has.

Resources: the default tuning (64 x 128 WGMMA tiles, CTA tile 128 x 128, 2 GEMM stages of
tile_k 128, 2 KV stages, one attention consumer: the fastest measured, docs/overlap.md section
3) takes 224 KiB of the 227 KiB of shared memory (LLaMA-3-8B heads), `shared_memory_bytes` says
how much. Five warpgroups are 640 threads: launched at 65536 / 640 -> 96 registers each, then
`plgpu.set_max_registers` moves registers from the producers (40) to the consumers
(`registers="auto"`: the attention consumers up to 128, the GEMM consumers the rest less a
margin, 136); "none" leaves every warpgroup at the launch count, "G/A/P" sets the three. ptxas
compiles the whole kernel under the launch count (measured: a 64 x 256 GEMM tile fails with
"Insufficient registers (96)"), so every role's code fits 96 registers and the consumers' extra
budget buys nothing at compile time: this caps the GEMM tile at 64 x 128 per consumer.

The attention's cache slots past `lengths` are read and masked: they must hold finite values
(`decode_attention_mgpu`'s module says why). On the GPU the kernel needs JAX 0.11's warpgroup
lowering, as the swap_ab consumer does (JAX 0.10 fails in layout inference). Runs on the CPU in
Mosaic GPU's interpreter (`interpret=True`, tests only); there the attention's WGMMAs are plain
dots.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import decode_attention_mgpu as attention

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

SHARED_MEMORY = 227 * 1024  # bytes a Hopper CTA may use
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM
_WG = 128  # threads per warpgroup
# Registers "auto" leaves unassigned: a budget that fills the register file hangs the kernel at
# its setmaxnreg (measured on an H200: 152/128/40 of 5 warpgroups never finishes, 136/128/40
# runs).
_REGISTER_MARGIN = 4 * 1024
_EPI_N = 64  # columns per epilogue store: 128-byte rows of bf16, one swizzle atom wide
_GEMM_SCRATCH = ("a_smem", "b_smem", "c_smem", "ab_full", "ab_free")


@dataclasses.dataclass(frozen=True)
class Registers:
    """Registers per thread: at launch (what 64 K registers give every warpgroup alike), then
    set by each role."""
    launch: int
    gemm: int
    attention: int
    producer: int


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the kernel is cut (the module docstring says what each role does). `parse` reads
    "tile_n=128,gemm_stages=3,registers=136/128/40"."""
    tile_m: int = 64  # rows of one GEMM consumer's WGMMA tile (64 or 128)
    tile_n: int = 128  # columns of the CTA's GEMM tile (a multiple of 64, at most 256)
    tile_k: int = 128  # K per ring slot (64 or 128)
    gemm_stages: int = 2  # A/B tiles in flight per CTA
    gemm_consumers: int = 2  # GEMM warpgroups, stacked along M: CTA tile rows = this x tile_m
    delay_release: int = 0  # 1: a GEMM slot is released one WGMMA later (two in flight)
    kv_stages: int = 2  # KV blocks in flight per CTA (a multiple of attention_consumers)
    attention_consumers: int = 1  # swap_ab consumer warpgroups (1-4)
    pages_per_block: int = 0  # KV pages per block; 0: 64-token blocks
    registers: str = "auto"  # "auto", "none" or "GEMM/attention/producer" per thread

    def __post_init__(self):
        checks = (
            ("tile_m", self.tile_m in (64, 128), "64 or 128"),
            ("tile_n", self.tile_n % 64 == 0 and 64 <= self.tile_n <= 256,
             "a multiple of 64 in 64..256"),
            ("tile_k", self.tile_k in (64, 128), "64 or 128"),
            ("gemm_stages", self.gemm_stages >= 2, ">= 2"),
            ("gemm_consumers", 1 <= self.gemm_consumers <= 3, "1..3"),
            ("delay_release", self.delay_release in (0, 1)
             and self.gemm_stages > self.delay_release + 1, "0 or 1, below gemm_stages - 1"),
            ("attention_consumers", 1 <= self.attention_consumers <= 4, "1..4"),
            ("kv_stages", self.kv_stages >= 2
             and self.kv_stages % self.attention_consumers == 0,
             ">= 2 and a multiple of attention_consumers"),
            ("pages_per_block", self.pages_per_block >= 0, ">= 0"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"tuning: {name} must be {want}, got {getattr(self, name)}")
        self.register_budget()  # raises on a bad `registers`

    @classmethod
    def parse(cls, spec: str) -> Tuning:
        """"key=value,key=value" (empty: the default) -> Tuning."""
        kwargs = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, sep, value = item.partition("=")
            field = cls.__dataclass_fields__.get(key)
            if not sep or field is None:
                raise ValueError(f"tuning: unknown knob {item!r}; knobs: "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            try:
                kwargs[key] = value if key == "registers" else int(value)
            except ValueError:
                raise ValueError(f"tuning: {key} must be an integer, got {value!r}") from None
        return cls(**kwargs)

    @property
    def warpgroups(self) -> int:
        return self.gemm_consumers + self.attention_consumers + 2  # and the two producers

    @property
    def cta_m(self) -> int:
        return self.gemm_consumers * self.tile_m

    def register_budget(self) -> Registers | None:
        """Registers per thread of each role (None: "none", left to the compiler). Raises
        ValueError naming `registers` where the budget cannot work: each a multiple of 8 in
        24..256, the producers at most the launch count, the consumers at least it (setmaxnreg
        only lowers or only raises), all of them within the register file."""
        launch = min(256, REGISTER_FILE // (_WG * self.warpgroups) // 8 * 8)
        ng, na = self.gemm_consumers, self.attention_consumers
        if self.registers == "none":
            return None
        if self.registers == "auto":
            producer = min(40, launch)
            left = REGISTER_FILE - 2 * _WG * producer
            attn = max(launch, min(128, left // (_WG * (ng + na)) // 8 * 8))
            gemm = min(240, (left - na * _WG * attn - _REGISTER_MARGIN) // (_WG * ng) // 8 * 8)
        else:
            try:
                gemm, attn, producer = (int(x) for x in self.registers.split("/"))
            except ValueError:
                raise ValueError(f"tuning: registers must be 'auto', 'none' or "
                                 f"'GEMM/attention/producer', got {self.registers!r}") from None
        budget = Registers(launch, gemm, attn, producer)
        total = _WG * (ng * gemm + na * attn + 2 * producer)
        if (any(r % 8 or not 24 <= r <= 256 for r in (gemm, attn, producer))
                or producer > launch or min(gemm, attn) < launch or total > REGISTER_FILE):
            raise ValueError(f"tuning: registers {gemm}/{attn}/{producer} (GEMM/attention/"
                             f"producer) do not fit: multiples of 8 in 24..256, producers <= "
                             f"{launch} <= consumers (the launch count of {self.warpgroups} "
                             f"warpgroups), {total} of {REGISTER_FILE} registers")
        return budget


def shared_memory_bytes(tuning: Tuning, *, head_dim: int, block_kv: int, table_cols: int,
                        itemsize: int = 2) -> int:
    """Bytes of shared memory the kernel allocates (each buffer from a 1 KiB boundary, as Mosaic
    GPU places them; the barriers; each attention consumer's reduction scratch): what must fit
    `SHARED_MEMORY`. Mosaic GPU's lowering checks the same bound."""
    t, na, rows = tuning, tuning.attention_consumers, attention.ROWS
    others = max(na - 1, 1)
    buffers = (
        t.gemm_stages * t.cta_m * t.tile_k, t.gemm_stages * t.tile_k * t.tile_n,  # A, B rings
        t.gemm_consumers * t.tile_m * _EPI_N,  # epilogue tiles
        na * 2 * rows * head_dim,  # Q, double-buffered
        t.kv_stages * block_kv * head_dim, t.kv_stages * block_kv * head_dim,  # K, V rings
        2 * table_cols * 4 // itemsize,  # page-table rows (int32)
        na * rows * block_kv, rows * head_dim,  # P, the output
        others * head_dim * rows * 4 // itemsize,  # partial results (fp32)
        others * rows * 4 // itemsize, others * rows * 4 // itemsize)
    barriers = 8 * (2 * t.gemm_stages + 2 + 2 * na + 4 * t.kv_stages + 2 * others)
    return (sum(-(-n * itemsize // 1024) * 1024 for n in buffers) + barriers
            + na * attention.REDUCTION_SCRATCH)


@dataclasses.dataclass(frozen=True)
class _Gemm:
    """The static shape of the GEMM side."""
    num_ctas: int
    m_tiles: int
    n_tiles: int
    k_steps: int
    tuning: Tuning
    interpret: bool

    @property
    def tiles(self) -> int:
        return self.m_tiles * self.n_tiles


def _gemm_roles(a_ref, b_ref, c_ref, s, g: _Gemm):
    """([GEMM consumer 0, ...], GEMM producer). a_ref [M_pad, K], b_ref [K, N], c_ref
    [M_pad, N]; s.a_smem [stages, cta_m, tile_k], s.b_smem [stages, tile_k, tile_n], s.c_smem
    [consumers, tile_m, 64]; s.ab_full (2 TMA copies) and s.ab_free (every consumer) per slot."""
    t = g.tuning
    stages, tile_m, tile_n, tile_k = t.gemm_stages, t.tile_m, t.tile_n, t.tile_k
    cta = lax.axis_index("programs")
    my_tiles = (g.tiles - cta + g.num_ctas - 1) // g.num_ctas

    def tile_of(i):  # (row block, column block) of this CTA's i-th tile, M fastest
        tile = cta + i * g.num_ctas
        return lax.rem(tile, g.m_tiles), tile // g.m_tiles

    def produce():
        def one_tile(i, step):  # step: ring slots filled for earlier tiles
            m, n = tile_of(i)

            def one_step(kk, carry):
                ring = step + kk
                slot = lax.rem(ring, stages)
                # the slot's previous tile step is consumed
                pl.when(ring >= stages)(functools.partial(plgpu.barrier_wait,
                                                          s.ab_free.at[slot]))
                ks = pl.ds(kk * tile_k, tile_k)
                plgpu.copy_gmem_to_smem(a_ref.at[pl.ds(m * t.cta_m, t.cta_m), ks],
                                        s.a_smem.at[slot], s.ab_full.at[slot])
                plgpu.copy_gmem_to_smem(b_ref.at[ks, pl.ds(n * tile_n, tile_n)],
                                        s.b_smem.at[slot], s.ab_full.at[slot])
                return carry

            lax.fori_loop(0, g.k_steps, one_step, 0)
            return step + g.k_steps

        total = lax.fori_loop(0, my_tiles, one_tile, jnp.int32(0))
        for slot in range(stages):  # the consumers' last release of each slot used
            pl.when(total > slot)(functools.partial(plgpu.barrier_wait, s.ab_free.at[slot]))

    def accumulate(c: int, step):
        """Consumer c's [tile_m, tile_n] fp32 product of the tile starting at ring `step`."""
        rows = pl.ds(c * tile_m, tile_m)

        def scope(acc_ref):
            def one_step(kk, carry):
                slot = lax.rem(step + kk, stages)
                plgpu.barrier_wait(s.ab_full.at[slot])
                plgpu.wgmma(acc_ref, s.a_smem.at[slot, rows], s.b_smem.at[slot])
                plgpu.wgmma_wait(t.delay_release)  # the WGMMA delay_release steps ago is done
                if t.delay_release:
                    done = lax.rem(step + kk - 1, stages)
                    pl.when(kk > 0)(functools.partial(plgpu.barrier_arrive, s.ab_free.at[done]))
                else:
                    plgpu.barrier_arrive(s.ab_free.at[slot])
                return carry

            lax.fori_loop(0, g.k_steps, one_step, 0)
            if t.delay_release:
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(s.ab_free.at[lax.rem(step + g.k_steps - 1, stages)])
            return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((tile_m, tile_n), jnp.float32))

    def consumer(c: int):
        c_mine = s.c_smem.at[c]

        def one_tile(i, step):
            m, n = tile_of(i)
            out = accumulate(c, step).astype(c_ref.dtype)
            row0 = m * t.cta_m + c * tile_m
            for e in range(tile_n // _EPI_N):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store left c_mine
                c_mine[...] = out[:, e * _EPI_N:(e + 1) * _EPI_N]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    c_mine, c_ref.at[pl.ds(row0, tile_m), pl.ds(n * tile_n + e * _EPI_N,
                                                                _EPI_N)])
            return step + g.k_steps

        lax.fori_loop(0, my_tiles, one_tile, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    return [functools.partial(consumer, c) for c in range(t.gemm_consumers)], produce


def _gemm_scratch(t: Tuning, dtype) -> dict:
    swz = attention.swizzled(dtype)
    return {
        "a_smem": plgpu.SMEM((t.gemm_stages, t.cta_m, t.tile_k), dtype, transforms=swz),
        "b_smem": plgpu.SMEM((t.gemm_stages, t.tile_k, t.tile_n), dtype, transforms=swz),
        "c_smem": plgpu.SMEM((t.gemm_consumers, t.tile_m, _EPI_N), dtype, transforms=swz),
        "ab_full": plgpu.Barrier(num_arrivals=2, num_barriers=t.gemm_stages),
        "ab_free": plgpu.Barrier(num_arrivals=t.gemm_consumers, num_barriers=t.gemm_stages),
    }


def _with_registers(role, n: int | None, action: str):
    def run():
        if n is not None:
            plgpu.set_max_registers(n, action=action)
        role()

    return run


def _kernel(a_ref, b_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, c_ref, o_ref, *scratch,
            names: tuple[str, ...], gemm: _Gemm, plan: attention.Plan):
    """Warpgroups: GEMM consumers, attention consumers, the GEMM producer, the attention
    producer."""
    smem = dict(zip(names, scratch))
    gemm_smem = {name: smem.pop(name) for name in _GEMM_SCRATCH}
    attention_consumers, attention_producer = attention.swap_ab_roles(
        (lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref), smem, plan)
    gemm_consumers, gemm_producer = _gemm_roles(a_ref, b_ref, c_ref,
                                                types.SimpleNamespace(**gemm_smem), gemm)
    t = gemm.tuning
    regs = t.register_budget()
    ng, na = t.gemm_consumers, t.attention_consumers

    def budget(role, field, action):
        return _with_registers(role, None if regs is None else getattr(regs, field), action)

    reducers = [(ng + i, budget(role, "attention", "increase"))
                for i, role in enumerate(attention_consumers)]
    others = [(i, budget(role, "gemm", "increase")) for i, role in enumerate(gemm_consumers)]
    others += [(ng + na, budget(gemm_producer, "producer", "decrease")),
               (ng + na + 1, budget(attention_producer, "producer", "decrease"))]
    attention.lower_roles(reducers, others, lax.axis_index("wg"), interpret=plan.interpret)


def gemm_beside_attention(
    a: jax.Array,  # [M, K]
    b: jax.Array,  # [K, N]
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [Hkv, P, page_size, D]
    v_pages: jax.Array,  # [Hkv, P, page_size, D]
    page_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    *,
    sm_scale: float,
    num_ctas: int | None = None,
    tuning: Tuning = Tuning(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # a @ b [M, N] (fp32 accumulation), attention [B, Hq, D]
    """a @ b and the paged GQA decode attention of q (`decode_attention_mgpu`'s inputs and
    result) in one kernel of `num_ctas` CTAs (None: one per SM), each running warpgroups of
    both. N must be a multiple of tile_n and K of tile_k; M is padded to the CTA tile."""
    if plgpu is None:  # pragma: no cover
        raise NotImplementedError("this jax has no Mosaic GPU Pallas backend")
    (m, k), (k2, n) = a.shape, b.shape
    if a.dtype != b.dtype or a.dtype != q.dtype or k != k2 or m < 1:
        raise ValueError(f"a [M, K] @ b [K, N] of q's dtype; got a {a.shape} {a.dtype}, "
                         f"b {b.shape} {b.dtype}, q {q.dtype}")
    if n % tuning.tile_n or k % tuning.tile_k:
        raise ValueError(f"tuning: tile_n={tuning.tile_n} must divide N={n} and "
                         f"tile_k={tuning.tile_k} K={k}")
    plan = attention.make_plan(q, k_pages, v_pages, sm_scale=sm_scale, num_programs=None,
                               pages_per_block=tuning.pages_per_block or None,
                               stages=tuning.kv_stages, consumers=tuning.attention_consumers,
                               consumer="swap_ab", interpret=interpret)
    q_items, tables = attention.prepare(q, page_tables, k_pages.shape[0])
    need = shared_memory_bytes(tuning, head_dim=q.shape[2], block_kv=plan.block_kv,
                               table_cols=tables.shape[1], itemsize=q.dtype.itemsize)
    if need > SHARED_MEMORY:
        raise ValueError(f"tuning: gemm_stages/kv_stages/tile_* need {need / 1024:.1f} KiB of "
                         f"shared memory, more than {SHARED_MEMORY // 1024} KiB")
    cta_m = tuning.cta_m
    m_tiles = -(-m // cta_m)
    ctas = max(1, min(num_ctas or _compat.num_sms(), max(m_tiles * (n // tuning.tile_n),
                                                         q_items.shape[0])))
    plan = dataclasses.replace(plan, num_programs=ctas)
    gemm = _Gemm(num_ctas=ctas, m_tiles=m_tiles, n_tiles=n // tuning.tile_n,
                 k_steps=k // tuning.tile_k, tuning=tuning, interpret=interpret)
    a_padded = jnp.pad(a, ((0, m_tiles * cta_m - m), (0, 0))) if m % cta_m else a
    named = {**_gemm_scratch(tuning, a.dtype),
             **attention.swap_ab_scratch(plan, q.shape[2], tables.shape[1], q.dtype)}
    call = plgpu.kernel(
        functools.partial(_kernel, names=tuple(named), gemm=gemm, plan=plan),
        out_type=(jax.ShapeDtypeStruct((m_tiles * cta_m, n), a.dtype),
                  jax.ShapeDtypeStruct(q_items.shape, q.dtype)),
        scratch_types=list(named.values()),
        grid=(ctas,),
        grid_names=("programs",),
        num_threads=tuning.warpgroups,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, reduction_scratch_bytes=attention.REDUCTION_SCRATCH,
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_compat.mosaic_gpu_interpret_params() if interpret else None,
    )
    c, o = call(a_padded, b, lengths.astype(jnp.int32), tables, q_items, k_pages, v_pages)
    return c[:m], attention.heads_of_items(o, q.shape[0], q.shape[1])

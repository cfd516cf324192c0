"""Can one nano-batch's GEMM run beside another nano-batch's decode attention? (GPU)

    python3 profiling/overlap_micro.py
    XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer=" \
        python3 profiling/overlap_micro.py

Shapes of a decode-heavy dense batch of LLaMA-3-8B: the up/gate GEMM of a 512-token
nano-batch ([512, 4096] × [4096, 28672]) and the paged decode attention of 150 sequences of
1300 tokens (our Pallas kernel). Variants, each timed as one jitted function (median of
--repeats timings of --calls calls enqueued back to back):
    gemm alone, attention alone, ideal = the larger of the two;
    back to back (one stream);
    streams: GEMM on gpu_stream:1, attention on gpu_stream:2 (compute_on);
    streams + scheduling group: both calls in one `_scheduling_group_id` group;
    concurrent graph: no streams, XLA's command buffer in CONCURRENT scheduling mode;
    persistent GEMM (--mgpu_programs): a Mosaic GPU GEMM on G CTAs
    (pallas_kernels/persistent_matmul.py) issued first, the attention beside it on the other
    SMs (full grid, or persistent on --rest_per_sm programs per free SM), on streams or in
    the concurrent graph; `--chain` makes the GEMM side a pipeline tick's four projections;
    fused kernel: both in ONE Pallas launch (pallas_kernels/fused_gemm_decode.py: GEMM tiles
    and attention programs split by program id; --fused_interleave, --fused_gemm_programs).
Prints whether the compiled HLO holds call-start/call-done pairs, and the speedup over back to
back. `--smoke` runs tiny shapes on the CPU without streams (checks the script only).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from nanoflow_jax.pipeline.executor import on_stream
from pallas_kernels import _compat
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.experimental.fused_gemm_decode import INTERLEAVES, fused_gemm_decode
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu
from pallas_kernels.persistent_matmul import MatmulTiling, persistent_matmul

flags.DEFINE_integer("gemm_tokens", 512, "rows of the GEMM's nano-batch")
flags.DEFINE_integer("decodes", 150, "sequences in the attention's nano-batch")
flags.DEFINE_integer("context", 1300, "tokens of context per decode")
flags.DEFINE_integer("repeats", 30, "timings; the median is reported")
flags.DEFINE_integer("calls", 10, "calls per timing, enqueued back to back (1: blocked each)")
flags.DEFINE_integer("page_size", 16, "tokens per KV page (one TMA copy each in the Mosaic GPU "
                     "attention)")
flags.DEFINE_bool("smoke", False, "tiny shapes on the CPU, no streams")
flags.DEFINE_list("persistent_programs", ["16", "33", "66"],
                  "decode attention as a persistent kernel of this many programs (SM "
                  "partitioning by grid size): alone, and beside the GEMM")
flags.DEFINE_list("persistent_tuning", [], "persistent attention: key=int pairs, e.g. "
                  "num_warps=8,num_stages=4")
flags.DEFINE_bool("chain", False, "the GEMM side is a pipeline tick's chain instead of one "
                  "GEMM: o_proj, up/gate, down and qkv of the nano-batch, with their "
                  "element-wise ops")
flags.DEFINE_list("mgpu_programs", [], "persistent Mosaic GPU GEMM on this many CTAs: alone, "
                  "and beside the attention (full grid, and on the remaining SMs)")
flags.DEFINE_list("rest_per_sm", ["1"], "beside the persistent GEMM on G CTAs, the attention "
                  "also runs persistent on m x (SMs - G) programs, for each m")
flags.DEFINE_list("mgpu_attention_programs", [], "the Mosaic GPU decode attention "
                  "(pallas_kernels/decode_attention_mgpu.py) on this many CTAs: alone, and "
                  "beside the persistent GEMM on the other SMs")
flags.DEFINE_integer("mgpu_attention_per_sm", 1, "Mosaic GPU attention: CTAs per SM left "
                     "free by the GEMM (2 with stages=2: two CTAs share an SM)")
flags.DEFINE_list("mgpu_attention_tuning", [], "Mosaic GPU attention: key=int pairs, e.g. "
                  "pages_per_block=4,stages=4")
flags.DEFINE_list("pairs", [], "G:P pairs: the persistent GEMM on G CTAs and the Mosaic GPU "
                  "attention on P CTAs in one concurrent graph, each order; G + P may exceed "
                  "the SMs, and CTAs of both then share an SM where shared memory and "
                  "registers allow (overlap inside the SM)")
flags.DEFINE_list("mgpu_tiling", [], "persistent GEMM: key=int pairs of MatmulTiling, e.g. "
                  "tile_m=128,tile_n=128,tile_k=64,max_concurrent_steps=4,wg_split_m=0")
flags.DEFINE_enum("fused_interleave", "alternate", INTERLEAVES,
                  "program order of the fused kernel")
flags.DEFINE_integer("fused_gemm_programs", 0,
                     "fused kernel: persistent GEMM programs (0: one per output tile)")
flags.DEFINE_list("fused_tuning", [], "fused kernel: key=int pairs, e.g. "
                  "block_m=64,block_n=128,block_k=64,num_warps=8,num_stages=4,num_splits=2")
F = flags.FLAGS


def _int_pairs(items: list[str]) -> dict[str, int]:
    """["num_warps=8", ...] -> {"num_warps": 8, ...}"""
    return {k: int(v) for k, v in (item.split("=", 1) for item in items)}


# No streams: XLA's CUDA graph runs independent kernels as parallel nodes (two kernels are below
# the default minimum graph size of 5, hence the second option).
CONCURRENT = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT",
              "xla_gpu_graph_min_graph_size": "1"}


def _issue(gemm_fn, attn_fn, attention_first: bool):
    """(x, w, q, k, v, tab, lens) -> (gemm_fn(x, w), attn_fn(q, k, v, tab, lens)), the two
    issued in the given order (the one issued first takes the SMs first)."""
    def run(x, w, q, k, v, tab, lens):
        if attention_first:
            a = attn_fn(q, k, v, tab, lens)
            return gemm_fn(x, w), a
        y = gemm_fn(x, w)
        return y, attn_fn(q, k, v, tab, lens)

    return run


def _grouped(gemm_fn, attn_fn, attention_first: bool = False):
    """GEMM on gpu_stream:1, attention on gpu_stream:2, both calls in one XLA scheduling group."""
    from jax.experimental.xla_metadata import set_xla_metadata

    run = _issue(on_stream(gemm_fn, 1), on_stream(attn_fn, 2), attention_first)

    def grouped(*args):
        with set_xla_metadata(_scheduling_group_id="1"):
            return run(*args)

    return jax.jit(grouped)


def _graph(gemm_fn, attn_fn, attention_first: bool = False):
    """Both on the main stream, in a CUDA graph that may run them at once."""
    return jax.jit(_issue(gemm_fn, attn_fn, attention_first), compiler_options=CONCURRENT)


def _time(fn, *args):
    """ms per call: `--calls` calls enqueued back to back and blocked once (device time per
    call); `--calls=1` blocks on each call (the host's launch and sync, 0.1-0.25 ms, are then
    counted in every call: not device time)."""
    return device_ms_per_call(fn, *args, calls=F.calls, repeats=F.repeats)


def main(argv):
    del argv
    smoke = F.smoke
    d, f, hq, hkv, dh, page = ((64, 128, 4, 2, 16, 4) if smoke
                               else (4096, 14336, 32, 8, 128, F.page_size))
    t, b, ctx = (32, 4, 20) if smoke else (F.gemm_tokens, F.decodes, F.context)
    dtype = jnp.float32 if smoke else jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (t, d), dtype)
    w = jax.random.normal(keys[1], (d, 2 * f), dtype) * d**-0.5
    if F.chain:  # LLaMA-3-8B's four projections ([in, out]), fresh weights each
        wk = jax.random.split(keys[1], 4)
        w = {"o": jax.random.normal(wk[0], (d, d), dtype) * d**-0.5, "gate_up": w,
             "down": jax.random.normal(wk[2], (f, d), dtype) * f**-0.5,
             "qkv": jax.random.normal(wk[3], (d, d + 2 * hkv * dh), dtype) * d**-0.5}
    pages_per = -(-ctx // page)
    num_pages = b * pages_per
    k_pages = jax.random.normal(keys[2], (hkv, num_pages, page, dh), dtype)
    v_pages = jax.random.normal(keys[3], (hkv, num_pages, page, dh), dtype)
    tables = jnp.asarray(np.random.default_rng(0).permutation(num_pages).reshape(b, pages_per),
                         jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = jax.random.normal(keys[4], (b, hq, dh), dtype)
    attn = functools.partial(decode_attention, sm_scale=dh**-0.5, interpret=smoke)
    fused = functools.partial(fused_gemm_decode, sm_scale=dh**-0.5, interpret=smoke,
                              interleave=F.fused_interleave,
                              gemm_programs=F.fused_gemm_programs or None,
                              **_int_pairs(F.fused_tuning))

    def gemm(x, w, matmul=jnp.matmul):
        if not F.chain:
            return matmul(x, w)
        h = x + matmul(x, w["o"])
        gate, up = jnp.split(matmul(h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True)
                                                      + 1e-5), w["gate_up"]), 2, axis=-1)
        h = h + matmul(jax.nn.silu(gate) * up, w["down"])
        return matmul(h, w["qkv"])

    def attend(q, k, v, tab, lens):
        return attn(q, k, v, tab, lens)

    args = (x, w, q, k_pages, v_pages, tables, lengths)
    variants = {
        "gemm alone": jax.jit(lambda x, w, *_: gemm(x, w)),
        "attention alone": jax.jit(lambda x, w, q, k, v, tab, lens: attend(q, k, v, tab, lens)),
        "back to back": jax.jit(lambda x, w, q, k, v, tab, lens: (gemm(x, w),
                                                                   attend(q, k, v, tab, lens))),
    }
    if not F.chain:
        variants["fused kernel"] = jax.jit(fused)
    if not smoke:
        variants["streams 1+2"] = jax.jit(lambda x, w, q, k, v, tab, lens: (
            on_stream(gemm, 1)(x, w), on_stream(attend, 2)(q, k, v, tab, lens)))
        # The pipeline's `nanoN` schedules: only the GEMM leaves the main stream.
        variants["GEMM on stream 1, attention on main"] = jax.jit(
            lambda x, w, q, k, v, tab, lens: (on_stream(gemm, 1)(x, w),
                                              attend(q, k, v, tab, lens)))
        variants["attention on stream 1, GEMM on main"] = jax.jit(
            lambda x, w, q, k, v, tab, lens: (gemm(x, w),
                                              on_stream(attend, 1)(q, k, v, tab, lens)))

        variants["streams + scheduling group"] = _grouped(gemm, attend)
        variants["concurrent graph, no streams"] = _graph(gemm, attend)
        variants["back to back, graph (serial)"] = jax.jit(
            lambda x, w, q, k, v, tab, lens: (gemm(x, w), attend(q, k, v, tab, lens)),
            compiler_options={"xla_gpu_graph_min_graph_size": "1"})
        for n in map(int, F.persistent_programs):
            part = functools.partial(attn, num_programs=n, **_int_pairs(F.persistent_tuning))
            variants[f"attention alone, {n} programs"] = jax.jit(
                lambda x, w, q, k, v, tab, lens, part=part: part(q, k, v, tab, lens))
            variants[f"streams + group, attention on {n} programs"] = _grouped(
                gemm, part, attention_first=True)
            variants[f"concurrent graph, attention on {n} programs"] = _graph(
                gemm, part, attention_first=True)
        tiling = MatmulTiling(**_int_pairs(F.mgpu_tiling))
        for g in map(int, F.mgpu_programs):
            mm = functools.partial(gemm, matmul=functools.partial(
                persistent_matmul, num_programs=g, tiling=tiling))
            variants[f"mgpu GEMM alone, {g} CTAs"] = jax.jit(lambda x, w, *_, mm=mm: mm(x, w))
            variants[f"streams + group, mgpu GEMM {g} CTAs | attention"] = _grouped(mm, attend)
            for m in map(int, F.rest_per_sm):
                rest = functools.partial(attn, num_programs=m * max(1, _compat.num_sms() - g),
                                         **_int_pairs(F.persistent_tuning))
                label = f"mgpu GEMM {g} CTAs | attention on the rest, {m} per SM"
                variants[f"streams + group, {label}"] = _grouped(mm, rest)
                variants[f"concurrent graph, {label}"] = _graph(mm, rest)
            variants[f"concurrent graph, mgpu GEMM {g} CTAs | attention"] = _graph(mm, attend)
        for p in map(int, F.mgpu_attention_programs):
            ctas = p * F.mgpu_attention_per_sm
            matt = functools.partial(decode_attention_mgpu, sm_scale=dh**-0.5, num_programs=ctas,
                                     **_int_pairs(F.mgpu_attention_tuning))
            variants[f"mgpu attention alone, {ctas} CTAs"] = jax.jit(
                lambda x, w, q, k, v, tab, lens, matt=matt: matt(q, k, v, tab, lens))
            g = _compat.num_sms() - p  # the persistent GEMM on the other SMs, issued first
            mm = functools.partial(gemm, matmul=functools.partial(
                persistent_matmul, num_programs=g, tiling=tiling))
            label = f"mgpu GEMM {g} CTAs | mgpu attention {ctas}"
            variants[f"concurrent graph, {label}"] = _graph(mm, matt)
            variants[f"streams + group, {label}"] = _grouped(mm, matt)
        for pair in F.pairs:
            g, p = map(int, pair.split(":"))
            mm = functools.partial(gemm, matmul=functools.partial(
                persistent_matmul, num_programs=g, tiling=tiling))
            matt = functools.partial(decode_attention_mgpu, sm_scale=dh**-0.5, num_programs=p,
                                     **_int_pairs(F.mgpu_attention_tuning))
            variants[f"mgpu GEMM alone, {g} CTAs"] = jax.jit(lambda x, w, *_, mm=mm: mm(x, w))
            variants[f"mgpu attention alone, {p} CTAs"] = jax.jit(
                lambda x, w, q, k, v, tab, lens, matt=matt: matt(q, k, v, tab, lens))
            variants[f"concurrent graph, mgpu GEMM {g} CTAs, then mgpu attention {p}"] = (
                _graph(mm, matt))
            variants[f"concurrent graph, mgpu attention {p} CTAs, then mgpu GEMM {g}"] = (
                _graph(mm, matt, attention_first=True))
    rows = []
    for name, fn in variants.items():
        try:
            hlo = fn.lower(*args).compile().as_text()
            ms = _time(fn, *args)
            rows.append((name, ms, hlo.count("call-start")))
        except Exception as e:  # a variant XLA rejects is a finding, not a crash
            import traceback

            traceback.print_exc()
            rows.append((name, float("nan"), f"failed: {type(e).__name__}: {str(e)[:160]}"))
    times = dict((r[0], r[1]) for r in rows)
    ideal = max(times["gemm alone"], times["attention alone"])
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}")
    print("variant | ms | call-start ops | speedup vs back to back")
    for name, ms, starts in rows:
        print(f"{name} | {ms:.3f} | {starts} | {times['back to back'] / ms:.3f}")
    print(f"ideal (larger of the two alone) | {ideal:.3f} | - | "
          f"{times['back to back'] / ideal:.3f}")
    for g in map(int, F.mgpu_programs):  # a fast but wrong GEMM would mislead too
        name = f"mgpu GEMM alone, {g} CTAs"
        if np.isfinite(times.get(name, np.nan)):
            got, want = variants[name](*args), variants["gemm alone"](*args)
            err = float(jnp.linalg.norm((got.astype(jnp.float32) - want.astype(jnp.float32))
                                        .ravel()) / jnp.linalg.norm(want.astype(jnp.float32)))
            print(f"{name} vs cuBLAS: rel err {err:.1e}")
    for p in map(int, F.mgpu_attention_programs):  # against the Triton kernel
        name = f"mgpu attention alone, {p * F.mgpu_attention_per_sm} CTAs"
        if np.isfinite(times.get(name, np.nan)):
            got = variants[name](*args).astype(jnp.float32)
            want = variants["attention alone"](*args).astype(jnp.float32)
            err = float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))
            print(f"{name} vs the Triton kernel: rel err {err:.1e}")
    if np.isfinite(times.get("fused kernel", np.nan)):  # a fast but wrong kernel would mislead
        got, want = variants["fused kernel"](*args), variants["back to back"](*args)
        errs = [float(jnp.linalg.norm((g.astype(jnp.float32) - r.astype(jnp.float32)).ravel())
                      / jnp.linalg.norm(r.astype(jnp.float32).ravel())) for g, r in zip(got, want)]
        print(f"fused kernel vs back to back: rel err GEMM {errs[0]:.1e}, attention {errs[1]:.1e}")


if __name__ == "__main__":
    app.run(main)

"""A decoder layer's GEMMs through XLA beside cuBLAS called from torch, on the same arrays (GPU).

    python3 profiling/gemm_vs_cublas.py --model=llama-3-8b --tokens=512,1024,2048

For each token count T and each GEMM of the layer (qkv, o, gate/up, down at the model's
shapes) it times, in device time (--calls products on rotating inputs in one executable or
one CUDA graph, so no host launch sits between them; the median of repeats):

    xla        jnp.dot(x [T, K], w [K, N]), the layout the model stores
    xla_nk     the same product with w stored [N, K] (x @ w.T, torch's nn.Linear layout)
    mgpu       the project's persistent Mosaic GPU GEMM on every SM (--mgpu)
    torch      torch.matmul on the same device buffers (DLPack), CUDA events
    torch_nk   torch.nn.functional.linear with w [N, K]

and prints ms and TFLOP/s per GEMM, the layer's sum for each, and the best JAX path's time
over torch's best. XLA_FLAGS given in the environment apply (profiling/gemm.sh runs several).
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave room for torch

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nanoflow_jax.benchmarks.timing import device_ms_per_call
from nanoflow_jax.model_loader import load_config

flags.DEFINE_string("model", "llama-3-8b", "preset or checkpoint directory (its shapes)")
flags.DEFINE_list("tokens", ["512", "1024", "2048"], "token counts T")
flags.DEFINE_bool("mgpu", True, "also time the persistent Mosaic GPU GEMM")
flags.DEFINE_bool("torch", True, "also time torch (cuBLAS) on the same buffers")
flags.DEFINE_integer("calls", 16, "products per timing, each on its own input, in one "
                     "executable (XLA) or one CUDA graph (torch)")
flags.DEFINE_integer("repeats", 10, "timings; the median is reported")
flags.DEFINE_string("label", os.environ.get("XLA_FLAGS", "") or "default XLA flags",
                    "printed with the table")
F = flags.FLAGS


def layer_gemms(config) -> dict[str, tuple[int, int]]:
    """(K, N) of each GEMM of one decoder layer."""
    d, f = config.hidden_size, config.intermediate_size
    return {"qkv": (d, config.q_size + 2 * config.kv_size), "o": (config.q_size, d),
            "gate_up": (d, 2 * f), "down": (f, d)}


def torch_ms_per_product(products, repeats: int) -> float:
    """ms per product of the callables in `products`, replayed as one CUDA graph (device time,
    as the XLA side: no host launch between products)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (cuBLAS picks its algorithm) outside the graph
        for p in products:
            p()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p in products:
            p()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(products))
    return float(np.median(times))


def xla_ms_per_product(product, w, xs) -> float:
    """ms per product of `product(x, w)` over the inputs `xs`, all in one executable (device
    time: one launch from the host for len(xs) products)."""
    many = jax.jit(lambda w, *xs: [product(x, w) for x in xs])
    return device_ms_per_call(many, w, *xs, calls=3, repeats=F.repeats) / len(xs)


def time_gemm(t: int, k: int, n: int) -> dict[str, float]:
    """ms per product of x [t, k] and a weight of [k, n], by path; F.calls inputs rotate."""
    keys = jax.random.split(jax.random.key(t * 7 + k + n), F.calls + 1)
    xs = [jax.random.normal(key, (t, k), jnp.bfloat16) for key in keys[1:]]
    w = jax.random.normal(keys[0], (k, n), jnp.bfloat16) * 0.02
    w_nk = jnp.asarray(w.T)
    ms = {"xla": xla_ms_per_product(jnp.dot, w, xs),
          "xla_nk": xla_ms_per_product(lambda x, w: x @ w.T, w_nk, xs)}
    if F.mgpu:
        from pallas_kernels.persistent_matmul import persistent_matmul

        ms["mgpu"] = xla_ms_per_product(persistent_matmul, w, xs)
    if F.torch:
        import torch
        import torch.nn.functional as tf

        txs = [torch.from_dlpack(x) for x in xs]
        tw, tw_nk = torch.from_dlpack(w), torch.from_dlpack(w_nk)
        ms["torch"] = torch_ms_per_product([lambda x=x: torch.matmul(x, tw) for x in txs],
                                           F.repeats)
        ms["torch_nk"] = torch_ms_per_product([lambda x=x: tf.linear(x, tw_nk) for x in txs],
                                              F.repeats)
        ref = torch.matmul(txs[0], tw).float()
        got = torch.from_dlpack(jnp.dot(xs[0], w)).float()
        err = float((got - ref).norm() / ref.norm())
        if err > 1e-2:
            raise AssertionError(f"XLA and torch disagree at T={t}, K={k}, N={n}: {err:.2e}")
    return ms


def main(argv):
    del argv
    config = load_config(F.model)
    gemms = layer_gemms(config)
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, {F.label}")
    header = None
    summary = []
    for t in (int(v) for v in F.tokens):
        total: dict[str, float] = {}
        for name, (k, n) in gemms.items():
            ms = time_gemm(t, k, n)
            if header is None:
                header = list(ms)
                print("T | gemm | K x N | " + " | ".join(f"{v} ms (TFLOP/s)" for v in header))
            flop = 2 * t * k * n
            print(f"{t} | {name} | {k} x {n} | " + " | ".join(
                f"{ms[v]:.4f} ({flop / ms[v] / 1e9:.0f})" for v in header), flush=True)
            for v in header:
                total[v] = total.get(v, 0.0) + ms[v]
        summary.append((t, total))
    print("\nper layer | " + " | ".join(f"{v} ms" for v in header) + " | best JAX / best torch")
    for t, total in summary:
        jax_best = min(total[v] for v in header if not v.startswith("torch"))
        torch_times = [total[v] for v in header if v.startswith("torch")]
        ratio = f"{jax_best / min(torch_times):.3f}" if torch_times else "-"
        print(f"T={t} | " + " | ".join(f"{total[v]:.4f}" for v in header) + f" | {ratio}")


if __name__ == "__main__":
    app.run(main)

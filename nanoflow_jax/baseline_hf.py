"""The HF transformers baseline: static batching with `model.generate` (torch SDPA attention).

What `scripts/benchmark_throughput.py --baseline=hf` runs beside our engine, on the same
workload and the same model shape:

* the model: presets (and our own orbax checkpoints) are built from the same `ModelConfig`
  (`config.to_hf_dict()` -> `LlamaConfig` / `MistralConfig` / `Qwen2Config`) with random
  weights, created directly on the device with HF's init skipped and then filled in place
  (llama-3-8b starts in seconds on a GPU); HF checkpoint directories load with
  `from_pretrained`. bfloat16 on a GPU, float32 on the CPU.
* the schedule: requests in workload order, `batch_size` at a time, prompts left-padded with an
  attention mask; every batch decodes until its longest output (`min_new_tokens =
  max_new_tokens`, so EOS never ends a row early) and the next batch starts only when it is done.
* the count, as ours: real prompt tokens + each request's own output length. Padding and the
  tokens a row decodes past its own output length (static batching's waste) are not counted;
  `padded_tokens` reports them.

torch and transformers are imported inside the functions: the JAX path never needs them.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Sequence
from typing import Any

_HF_CONFIGS = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
               "Qwen2ForCausalLM": "Qwen2Config", "MixtralForCausalLM": "MixtralConfig",
               "Qwen2MoeForCausalLM": "Qwen2MoeConfig"}
INIT_STD = 0.02  # HF's initializer_range for these models


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_config_from(config):
    """A transformers config of the same shape (and RoPE) as our `ModelConfig`."""
    import transformers

    arch = config.architecture
    hf = {k: v for k, v in config.to_hf_dict().items() if k != "architectures"}
    if arch == "MistralForCausalLM":
        hf["sliding_window"] = None  # MistralConfig defaults to 4096; ours attends to all
    if arch == "Qwen2ForCausalLM":
        hf["use_sliding_window"] = False
    hf_config = getattr(transformers, _HF_CONFIGS[arch])(**hf)
    hf_config.architectures = [arch]
    return hf_config


def _no_init_weights():
    """transformers' context that skips `_init_weights` (module moved in transformers 5)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            mod = __import__(module, fromlist=["no_init_weights"])
        except ImportError:
            continue
        if hasattr(mod, "no_init_weights"):
            return mod.no_init_weights()
    return contextlib.nullcontext()


def _random_init_(model, seed: int) -> None:
    """Fills every parameter in place on its device: N(0, 0.02) for matrices and embeddings,
    1 for norm weights, 0 for biases (what HF's own init gives, without its per-module walk)."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, INIT_STD, generator=gen)


def load_hf_model(model: str, dtype: str | None = None, device: str | None = None,
                  seed: int = 0):
    """(torch model in eval mode, info dict). `model`: a preset name or a checkpoint directory."""
    import torch
    import transformers

    from nanoflow_jax import weights
    from nanoflow_jax.config import ModelConfig
    from nanoflow_jax.model_loader import load_config

    device = device or default_device()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    torch_dtype = getattr(torch, dtype)
    config = load_config(model)
    t0 = time.perf_counter()
    is_hf_checkpoint = os.path.isdir(model) and not weights.is_orbax_checkpoint(model)
    if is_hf_checkpoint:
        try:  # device_map loads straight onto the device, but needs accelerate
            import accelerate  # noqa: F401
            placement = {"device_map": device}
        except ImportError:
            placement = {}
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, attn_implementation="sdpa", **placement)
        hf_model.to(device)
        source = "from_pretrained"
    else:
        hf_config = hf_config_from(config)
        hf_config._attn_implementation = "sdpa"
        # The same shape and RoPE as ours, or the comparison means nothing.
        back = ModelConfig.from_hf_dict(hf_config.to_dict())
        if back != config:
            raise AssertionError(f"the HF config does not match ours:\n{back}\n{config}")
        cls = getattr(transformers, config.architecture)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            with torch.device(device), _no_init_weights():
                hf_model = cls(hf_config)
        finally:
            torch.set_default_dtype(previous)
        hf_model.tie_weights()  # skipped with the init (tie_word_embeddings: qwen2 small)
        # Parameters only: buffers such as RoPE's inv_freq stay float32, as from_pretrained.
        for p in hf_model.parameters():
            if p.dtype != torch_dtype:
                p.data = p.data.to(torch_dtype)
        _random_init_(hf_model, seed)
        source = "random init"
    hf_model.eval()
    hf_model.generation_config.pad_token_id = 0
    n_params = sum(p.numel() for p in hf_model.parameters())  # tied weights counted once
    if n_params != config.param_count:
        raise AssertionError(f"the HF model has {n_params} parameters, ours {config.param_count}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    info = {"device": device, "dtype": dtype, "source": source,
            "load_s": time.perf_counter() - t0, "param_count": n_params,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "attn_implementation": getattr(hf_model.config, "_attn_implementation", "sdpa")}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name()
    return hf_model, info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def generate_batch(hf_model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   device: str):
    """Left-padded greedy generate of exactly `max_new_tokens` for every row; new token ids
    [rows, max_new_tokens] (on the device)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, temperature=None,
            top_p=None, top_k=None, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, pad_token_id=0, use_cache=True)
    new = out[:, width:]
    if new.shape[1] != max_new_tokens:
        raise AssertionError(f"generate made {new.shape[1]} tokens, not {max_new_tokens}")
    return new


def run_static_batches(hf_model, prompts: Sequence[Sequence[int]],
                       output_lens: Sequence[int], batch_size: int, device: str,
                       warmup: bool = True) -> dict[str, Any]:
    """Times the requests in workload order, `batch_size` at a time; see the module doc."""
    if len(prompts) != len(output_lens) or not prompts:
        raise ValueError("need one output length per prompt, and at least one prompt")
    batches = [(prompts[i:i + batch_size], output_lens[i:i + batch_size])
               for i in range(0, len(prompts), batch_size)]
    if warmup:  # kernels, allocator, cuBLAS heuristics: the first batch's shapes, few tokens
        first_p, first_o = batches[0]
        generate_batch(hf_model, first_p, min(4, max(first_o)), device)
        _sync(device)
    steps = padded = 0
    batch_s = []
    _sync(device)
    t0 = time.perf_counter()
    for bp, bo in batches:
        tb = time.perf_counter()
        n_new = max(bo)
        generate_batch(hf_model, bp, n_new, device)
        _sync(device)
        batch_s.append(time.perf_counter() - tb)
        steps += n_new
        width = max(len(p) for p in bp)
        padded += sum(width - len(p) for p in bp) + sum(n_new - o for o in bo)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "batches": len(batches), "steps": steps,
            "padded_tokens": padded, "batch_s": batch_s}


def free_device_memory() -> None:
    """Returns torch's cached device memory to the driver (drop the model first), so JAX can
    take its share of the GPU afterwards."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_peak_flops(device: str | None = None, n: int | None = None,
                       repeats: int = 10, calls: int = 10) -> float:
    """A large GEMM's FLOP/s through torch (bf16 on a GPU), for `--baseline=hf-only` runs that
    never start JAX; otherwise bench.measure_peak_flops (JAX) is the ceiling. Each timing runs
    `calls` products back to back and synchronises once, as bench.measure_peak_flops does."""
    import statistics

    import torch

    device = device or default_device()
    on_gpu = device.startswith("cuda")
    n = n or (8192 if on_gpu else 1024)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), dtype=dtype, device=device, generator=gen)
    b = torch.randn((n, n), dtype=dtype, device=device, generator=gen)
    a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        _sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return 2 * n**3 / statistics.median(times)


def peak_memory_gib(device: str) -> float:
    if not device.startswith("cuda"):
        return 0.0
    import torch

    return torch.cuda.max_memory_allocated() / 2**30

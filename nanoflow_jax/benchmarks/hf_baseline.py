"""The HF transformers peers of the throughput benchmark, on our workload and model shape.

`scripts/benchmark_throughput.py --baseline=hf-static,hf-cb` runs them before our engine
(`run_peers`: one model load, one result row per peer and workload):

* the model: presets (and our own orbax checkpoints) are built from the same `ModelConfig`
  (`config.to_hf_dict()` -> `LlamaConfig` / `MistralConfig` / `Qwen2Config`) with random
  weights, created directly on the device with HF's init skipped and then filled in place
  (llama-3-8b starts in seconds on a GPU); HF checkpoint directories load with
  `from_pretrained`. bfloat16 on a GPU, float32 on the CPU. SDPA attention.
* `hf-static` ("schedule": "hf-transformers-static"): `model.generate`, requests in workload
  order, `batch_size` at a time, prompts left-padded with an attention mask; every batch decodes
  until its longest output (`min_new_tokens = max_new_tokens`, so EOS never ends a row early) and
  the next batch starts only when it is done. `padded_tokens` counts static batching's waste
  (padding, and tokens decoded past a row's own output length).
* `hf-cb` ("schedule": "hf-transformers-cb"): transformers' continuous batching with a paged KV
  cache, the manager under `model.generate_batch` (`continuous_batching_context_manager`).
  `generate_batch` itself takes one `max_new_tokens` for all requests, so the requests go in
  through the manager's `add_request`, each with its own `max_new_tokens` and
  `eos_token_id=-1` (no EOS: a request stops at exactly its length, checked per request).
  Attention: transformers' own choice unless `cb_attn` says otherwise: flash attention (varlen)
  when the flash_attn package is installed, else SDPA over the paged cache ("paged|sdpa" in 5.17,
  plain "sdpa" from 5.2x); the row gives the one used. SDPA attends every query token of a pass to
  the keys of every request in it, under a block-diagonal mask, so its cost grows with (tokens per
  pass) x (KV of all requests in the pass): far slower than flash at large batches. The KV cache
  (`num_blocks` of `page_size` tokens; 5.17 calls the page size `block_size`) and
  `max_batch_tokens` default to transformers' sizing from free device memory; on the CPU, a cache
  that holds the whole workload and 512 tokens a pass. With `num_blocks` alone,
  `max_batch_tokens` is transformers' default, 8192 (5.17 would fill the memory with it). Prefix
  sharing is off (random prompts share no prefix).
  `steps` are the manager's forward passes (`current_batch`), chunked prefills included.
* the count, as ours: real prompt tokens + each request's own output length, over the timed run
  only; a warm-up (the first requests, a few tokens each) and the cache's set-up run before it.
  A peer that fails (an API missing or broken in the installed transformers) gives a row with
  "peer_error" and no throughput, and the benchmark goes on.

torch and transformers are imported inside the functions: the JAX path never needs them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

# --baseline names -> the "schedule" of their result rows. "hf" is "hf-static".
PEER_SCHEDULES = {"hf-static": "hf-transformers-static", "hf-cb": "hf-transformers-cb"}
PEER_ALIASES = {"hf": "hf-static"}
CB_ATTN = ("auto", "sdpa", "eager")  # auto: transformers' choice (flash when installed, else sdpa)
CB_CUDA_GRAPH = ("auto", "on", "off")  # auto: transformers' choice (on only without a mask)
HF_MAX_BATCH_TOKENS = 8192  # transformers' default tokens per pass (5.17 and 5.2x)
CPU_MAX_BATCH_TOKENS = 512  # ours on the CPU, where the SDPA mask is [tokens, cache + tokens]
WARMUP_REQUESTS, WARMUP_TOKENS = 16, 2  # the untimed warm-up before a continuous-batching run

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
    # Sliding window included: to_hf_dict writes the window and each layer's type.
    hf = {k: v for k, v in config.to_hf_dict().items() if k != "architectures"}
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
                       warmup: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
    """Times the requests in workload order, `batch_size` at a time; see the module doc. Raises
    TimeoutError when a batch ends past `timeout_s`."""
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
    for k, (bp, bo) in enumerate(batches):
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"stopped after {timeout_s:g} s with {k} of {len(batches)} "
                               "batches done")
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


class PeerUnavailable(RuntimeError):
    """The installed transformers lacks (or breaks) what a peer needs."""


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """How the peers run; None leaves the value to transformers."""

    batch_size: int = 64  # hf-static: requests per static batch
    max_batch_tokens: int | None = None  # hf-cb: most tokens in one forward pass
    num_blocks: int | None = None  # hf-cb: KV cache blocks of page_size tokens (every layer)
    page_size: int | None = None  # hf-cb: tokens per cache block (transformers: 256)
    # hf-cb: most requests in one pass (transformers: min(requests, 1024)); with SDPA, a pass
    # costs its tokens x the KV of its requests, so fewer requests a pass can be faster.
    max_requests: int | None = None
    cb_attn: str = "auto"  # hf-cb: one of CB_ATTN
    cb_cuda_graph: str = "auto"  # hf-cb: one of CB_CUDA_GRAPH
    # A timed run still going after this many seconds is stopped and its row gets a peer_error
    # (a slow peer cannot use up a GPU command's time limit and lose the other results).
    timeout_s: float | None = None

    def __post_init__(self):
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"baseline_timeout_s must be > 0, got {self.timeout_s}")
        for knob, flag in (("batch_size", "batch_size"), ("max_batch_tokens", "max_batch_tokens"),
                           ("num_blocks", "num_blocks"), ("page_size", "page_size"),
                           ("max_requests", "cb_max_requests")):
            value = getattr(self, knob)
            if value is not None and value < 1:
                raise ValueError(f"baseline_{flag} must be >= 1, got {value}")
        if self.page_size is not None and self.page_size < 4:
            raise ValueError(f"baseline_page_size must be >= 4 (transformers' least), "
                             f"got {self.page_size}")
        if self.cb_attn not in CB_ATTN:
            raise ValueError(f"baseline_cb_attn must be one of {CB_ATTN}, got {self.cb_attn!r}")
        if self.cb_cuda_graph not in CB_CUDA_GRAPH:
            raise ValueError(f"baseline_cb_cuda_graph must be one of {CB_CUDA_GRAPH}, "
                             f"got {self.cb_cuda_graph!r}")


def parse_peers(names: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """`--baseline` values -> (peers in run order, whether they run alone). "none" (or nothing):
    no peer; "hf" is "hf-static"; "hf-only" (kept from the single-peer flag) is hf-static alone."""
    peers, alone = [], False
    for name in (n.strip() for n in names):
        if name in ("", "none"):
            continue
        if name == "hf-only":
            name, alone = "hf-static", True
        name = PEER_ALIASES.get(name, name)
        if name not in PEER_SCHEDULES:
            raise ValueError(f"--baseline: unknown peer {name!r}; choose from none, hf, "
                             f"{', '.join(PEER_SCHEDULES)}, hf-only")
        if name not in peers:
            peers.append(name)
    return tuple(peers), alone


def _cb_classes():
    """(ContinuousBatchingConfig, WorkloadHints or None) of the installed transformers."""
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError as e:
        raise PeerUnavailable(f"no ContinuousBatchingConfig in this transformers ({e})") from e
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:  # only sizes the decode fast path and max requests per batch
        WorkloadHints = None
    return ContinuousBatchingConfig, WorkloadHints


def _cb_config(settings: PeerSettings, prompts, output_lens, device: str):
    """A ContinuousBatchingConfig for this transformers: 5.17 names the page size `block_size`
    (5.2x: `page_size`, `block_size` deprecated) and has no `auto_switch_to_flash`."""
    config_cls, _ = _cb_classes()
    fields = {f.name for f in dataclasses.fields(config_cls)}
    page_field = "page_size" if "page_size" in fields else "block_size"
    page = settings.page_size or getattr(config_cls(), page_field)
    num_blocks = settings.num_blocks
    if num_blocks is None and not device.startswith("cuda"):
        # transformers sizes the cache from free memory, on the CPU up to 60-90% of the RAM:
        # take just enough blocks to hold every request at once.
        num_blocks = sum(math.ceil((len(p) + o) / page) for p, o in zip(prompts, output_lens))
    max_batch_tokens = settings.max_batch_tokens
    if max_batch_tokens is None and num_blocks is not None:
        # Given num_blocks alone, 5.17 solves for the largest max_batch_tokens the memory allows
        # (an attention mask as large as the memory); 5.2x takes its default, as here.
        on_gpu = device.startswith("cuda")
        max_batch_tokens = HF_MAX_BATCH_TOKENS if on_gpu else CPU_MAX_BATCH_TOKENS
    kwargs = {page_field: page, "num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens,
              "max_requests_per_batch": settings.max_requests, "allow_block_sharing": False}
    if settings.cb_cuda_graph != "auto":
        kwargs["use_cuda_graph"] = settings.cb_cuda_graph == "on"
    if settings.cb_attn != "auto" and "auto_switch_to_flash" in fields:
        kwargs["auto_switch_to_flash"] = False
    return config_cls(**kwargs), page_field


def _cb_attn_target(attn: str, version_has_auto_switch: bool) -> str | None:
    """The attn_implementation to set before continuous batching, None for transformers' choice.
    5.17 switches any implementation without the "paged|" prefix to flash when installed, so a
    requested sdpa is given as "paged|sdpa" there; 5.2x takes plain "sdpa" (with
    auto_switch_to_flash=False) and "paged|eager" for eager."""
    if attn == "auto":
        return None
    if attn == "eager" or not version_has_auto_switch:
        return f"paged|{attn}"
    return attn


def _submit_and_wait(manager, prompts, output_lens, tag: str,
                     timeout_s: float | None = None) -> int:
    """Adds every request with its own max_new_tokens and no EOS, waits for all of them (at most
    `timeout_s`: then stops the manager at once and raises TimeoutError); checks each output
    length. Returns the number of generated tokens."""
    t0 = time.perf_counter()
    ids = []
    for i, (p, o) in enumerate(zip(prompts, output_lens)):
        rid = manager.add_request(list(p), request_id=f"{tag}{i}", max_new_tokens=int(o),
                                  eos_token_id=-1)
        if rid is None:
            raise RuntimeError(f"the continuous batching manager refused request {tag}{i}")
        ids.append(rid)
    done = {}
    while len(done) < len(ids):
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            manager.stop(block=True, timeout=60, hard_stop=True)
            raise TimeoutError(f"stopped after {timeout_s:g} s with {len(done)} of {len(ids)} "
                               f"requests done")
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                break
            continue
        if result.is_finished():
            done[result.request_id] = result
    status = getattr(manager, "background_thread_status", None)
    fatal = getattr(status, "fatal_error", None)
    if len(done) < len(ids):
        raise RuntimeError(f"continuous batching stopped with {len(done)} of {len(ids)} requests "
                           f"done" + (f": {type(fatal).__name__}: {fatal}" if fatal else ""))
    failed = [(rid, done[rid].error) for rid in ids if done[rid].error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first {failed[0][0]}: {failed[0][1]}")
    lens = [len(done[rid].generated_tokens) for rid in ids]
    wrong = [(rid, n, o) for rid, n, o in zip(ids, lens, output_lens) if n != o]
    if wrong:
        raise AssertionError(f"continuous batching made {wrong[0][1]} tokens for {wrong[0][0]}, "
                             f"not {wrong[0][2]} ({len(wrong)} requests off)")
    return sum(lens)


def run_continuous_batching(hf_model, prompts: Sequence[Sequence[int]],
                            output_lens: Sequence[int], device: str,
                            settings: PeerSettings = PeerSettings(),
                            warmup: bool = True) -> dict[str, Any]:
    """Times the requests through transformers' continuous batching, all submitted at once; see
    the module doc. Returns the timing, the steps and the settings transformers resolved."""
    import torch
    from transformers import GenerationConfig

    if len(prompts) != len(output_lens) or not prompts:
        raise ValueError("need one output length per prompt, and at least one prompt")
    if not hasattr(hf_model, "continuous_batching_context_manager"):
        raise PeerUnavailable("the model has no continuous_batching_context_manager "
                              "(transformers without continuous batching)")
    _, hints_cls = _cb_classes()
    cb_config, page_field = _cb_config(settings, prompts, output_lens, device)
    has_auto_switch = hasattr(cb_config, "auto_switch_to_flash")
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(output_lens),
                                  eos_token_id=-1, pad_token_id=0)
    hints = {}
    if hints_cls is not None:
        hints["workload_hints"] = hints_cls(max_prompt_length=max(len(p) for p in prompts),
                                            max_generated_length=max(output_lens),
                                            num_requests=len(prompts))
    attn_before = hf_model.config._attn_implementation
    target = _cb_attn_target(settings.cb_attn, has_auto_switch)
    if target is not None:
        hf_model.set_attn_implementation(target)
    # torch.no_grad, not inference_mode: 5.17 runs its loop thread under no_grad, and tensors
    # made by the warm-up in inference mode could not be reset there.
    try:
        with torch.no_grad():
            t_setup = time.perf_counter()
            with hf_model.continuous_batching_context_manager(
                    generation_config=gen_config, continuous_batching_config=cb_config,
                    block=True, timeout=60, warmup=True, **hints) as manager:
                attn_used = hf_model.config._attn_implementation
                if warmup:  # kernels, allocator: the first requests, a few tokens each
                    n = min(WARMUP_REQUESTS, len(prompts))
                    _submit_and_wait(manager, prompts[:n],
                                     [min(WARMUP_TOKENS, o) for o in output_lens[:n]], "warmup")
                _sync(device)
                setup_s = time.perf_counter() - t_setup
                steps0 = manager.current_batch
                t0 = time.perf_counter()
                n_out = _submit_and_wait(manager, prompts, output_lens, "req",
                                         settings.timeout_s)
                _sync(device)
                elapsed = time.perf_counter() - t0
                steps = manager.current_batch - steps0
                resolved = manager.continuous_batching_config
    finally:
        if target is not None:
            hf_model.set_attn_implementation(attn_before)
    page = getattr(resolved, page_field)
    cuda_graph = resolved.use_cuda_graph
    return {"elapsed_s": elapsed, "steps": steps, "output_tokens": n_out, "setup_s": setup_s,
            "attn_implementation": attn_used, "max_batch_tokens": resolved.max_batch_tokens,
            "num_blocks": resolved.num_blocks, "page_size": page,
            "kv_cache_tokens": resolved.num_blocks * page,
            "max_requests_per_batch": resolved.max_requests_per_batch,
            "use_cuda_graph": list(cuda_graph) if isinstance(cuda_graph, tuple) else cuda_graph,
            "use_async_batching": resolved.use_async_batching}


def _fresh_device_memory(device: str) -> None:
    """Empties torch's cache too: continuous batching sizes its KV cache from the memory torch
    has not reserved, and the previous peer's reservations would shrink it."""
    if device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_peer(peer: str, hf_model, info: dict, workload: str, requests, prompts,
             settings: PeerSettings = PeerSettings()) -> dict[str, Any]:
    """One peer on one workload: its result row (throughput, settings, versions). An error in
    the peer gives a row with "peer_error" and no throughput rather than an exception."""
    n_in = sum(r.prompt_len for r in requests)
    n_out = sum(r.output_len for r in requests)
    output_lens = [r.output_len for r in requests]
    device = info["device"]
    row = {"workload": workload, "num_requests": len(requests),
           "schedule": PEER_SCHEDULES[peer], "peer": peer,
           "device": info.get("device_name", device), "torch": info["torch"],
           "transformers": info["transformers"], "dtype": info["dtype"],
           "weights": info["source"], "attn_implementation": info["attn_implementation"],
           "prompt_tokens": n_in, "output_tokens": n_out}
    if peer == "hf-static":
        row.update(batch_size=settings.batch_size,
                   attn_implementation=getattr(hf_model.config, "_attn_implementation", None))
    _fresh_device_memory(device)
    try:
        if peer == "hf-static":
            run = run_static_batches(hf_model, prompts, output_lens, settings.batch_size, device,
                                     timeout_s=settings.timeout_s)
            row.update(batches=run["batches"], padded_tokens=run["padded_tokens"],
                       batch_s=run["batch_s"])
        else:
            run = run_continuous_batching(hf_model, prompts, output_lens, device, settings)
            row.update({k: v for k, v in run.items()
                        if k not in ("elapsed_s", "steps", "output_tokens")})
            row["cb_attn"] = settings.cb_attn
    except Exception as e:  # noqa: BLE001 - the row says what broke; the benchmark goes on
        traceback.print_exc(file=sys.stderr)
        row.update(peer_error=f"{type(e).__name__}: {e}", elapsed_s=None,
                   total_tokens_per_s=None, output_tokens_per_s=None, requests_per_s=None,
                   steps=None, step_ms=None, peak_tflops=None, optimal_tokens_per_s=None,
                   percent_of_optimal=None, host_ms_per_step=None)
        return row
    elapsed = run["elapsed_s"]
    row.update(elapsed_s=elapsed, total_tokens_per_s=(n_in + n_out) / elapsed,
               output_tokens_per_s=n_out / elapsed, requests_per_s=len(requests) / elapsed,
               peak_tflops=None, optimal_tokens_per_s=None, percent_of_optimal=None,
               steps=run["steps"], step_ms=1e3 * elapsed / max(run["steps"], 1),
               host_ms_per_step=None, peak_memory_gib=peak_memory_gib(device),
               peer_error=None)
    return row


def run_peers(model: str, peers: Sequence[str], jobs, settings: PeerSettings = PeerSettings(),
              dtype: str | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Every peer on every workload, the model loaded once: rows in (workload, peer) order.
    `jobs`: (workload name, requests, prompt token ids) triples. Frees the device memory after."""
    t0 = time.perf_counter()
    try:
        hf_model, info = load_hf_model(model, dtype=dtype, seed=seed)
    except Exception as e:  # noqa: BLE001 - no peer can run; say so in every row
        traceback.print_exc(file=sys.stderr)
        error = f"loading the model: {type(e).__name__}: {e}"
        return [{"model": model, "workload": w, "num_requests": len(reqs),
                 "schedule": PEER_SCHEDULES[p], "peer": p, "peer_error": error,
                 "total_tokens_per_s": None, "output_tokens_per_s": None,
                 "percent_of_optimal": None, "step_ms": None, "host_ms_per_step": None}
                for w, reqs, _ in jobs for p in peers]
    startup = time.perf_counter() - t0
    rows = []
    for workload, reqs, prompts in jobs:
        for peer in peers:
            row = {"model": model, **run_peer(peer, hf_model, info, workload, reqs, prompts,
                                              settings)}
            row.update(startup_s=startup, load_s=info["load_s"])
            rows.append(row)
    del hf_model
    free_device_memory()
    return rows


def add_optimal(row: dict, peak_flops: float, param_count: int) -> None:
    """% of optimal as ours: total tokens/s ÷ (peak FLOP/s ÷ 2·params). Rows with a peer_error
    keep None."""
    from nanoflow_jax.benchmarks.timing import optimal_tokens_per_s  # imports JAX, starts nothing

    optimal = optimal_tokens_per_s(peak_flops, param_count)
    row.update(peak_tflops=peak_flops / 1e12, optimal_tokens_per_s=optimal)
    if row.get("total_tokens_per_s") is not None:
        row["percent_of_optimal"] = 100 * row["total_tokens_per_s"] / optimal


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

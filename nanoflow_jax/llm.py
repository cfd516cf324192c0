"""`LLM`: offline batch generation, vLLM's API.

    from nanoflow_jax import LLM, SamplingParams
    llm = LLM(model="tiny-llama", max_num_batched_tokens=512)
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8))
    outs[0].outputs[0].text

`LLM(model="llama-3-70b", tensor_parallel_size=8)` splits the model over 8 local devices
(`nanoflow_jax.parallel`); every EngineConfig knob is a keyword argument.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.llm_engine import LLMEngine
from nanoflow_jax.engine.outputs import RequestOutput
from nanoflow_jax.sampling_params import SamplingParams

Prompt = str | dict[str, Any]


class LLM:
    def __init__(self, model: str = "tiny-llama", *, config: EngineConfig | None = None,
                 **engine_args):
        """`engine_args` are EngineConfig's fields; or pass a whole `config` (its model wins)."""
        if config is None:
            config = EngineConfig(model=model, **engine_args)
        elif engine_args:
            raise ValueError("pass either config or engine arguments, not both")
        self.engine = LLMEngine(config, stream_outputs=False)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in input order.

        A prompt is a string or `{"prompt_token_ids": [...]}`; `sampling_params` is one
        `SamplingParams` for all or a list with one per prompt. Bad input raises ValueError
        before anything is queued.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:  # add_request validates each prompt; on a bad one, nothing stays queued
            for prompt, p in zip(prompts, params):
                rid = f"llm-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        start, stats = time.perf_counter(), self.engine.stats
        tokens0 = stats.prompt_tokens + stats.generated_tokens
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                rate = (stats.prompt_tokens + stats.generated_tokens - tokens0) / elapsed
                bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        while self.engine.has_unfinished_requests():  # the step dispatched after the last
            self.engine.step()
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]

"""On a GPU: the engine with the Pallas kernels generates what it generates with the jnp
reference attention (greedy, fp32, tiny model), chunked and decoding; and every nano-batch
schedule given generates what the sequential one does (streams and concurrent graphs only
exist on the GPU). Prints one line per check.

    python3 profiling/gpu_engine_check.py
"""
import sys

import numpy as np

from nanoflow_jax import LLM, SamplingParams

SCHEDULES = sys.argv[1:] or ["nano2-pipe", "nano2-pipe-nostreams+graph"]


def main():
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, 512, int(n)).tolist()}
               for n in rng.integers(1, 300, 24)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for impl, schedule in [("pallas", "sequential"), ("reference", "sequential")] + [
            ("pallas", s) for s in SCHEDULES]:
        llm = LLM("tiny-llama", dtype="float32", attention_impl=impl, max_num_batched_tokens=128,
                  min_bucket=128, max_model_len=512, page_size=16, num_pages=1024,
                  schedule=schedule)
        outs[impl, schedule] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                               use_tqdm=False)]
    want = outs["pallas", "sequential"]
    for (impl, schedule), got in outs.items():
        if (impl, schedule) != ("pallas", "sequential"):
            same = sum(a == b for a, b in zip(got, want))
            print(f"gpu_engine_check: {same}/{len(prompts)} greedy outputs identical "
                  f"({impl} {schedule} vs pallas sequential)")


if __name__ == "__main__":
    main()

"""Generate from the command line with any checkpoint directory or preset.

    python scripts/generate.py                                   # tiny-llama on the CPU
    python scripts/generate.py --model=/path/to/Llama-3-8B-Instruct --chat \
        --prompt="What is the capital of France?" --max_tokens=64

Presets have random weights and the built-in byte-level tokenizer, so their text is noise:
they exist to exercise the code path and to measure speed.
"""
import time

from absl import app, flags

from nanoflow_jax import LLM, SamplingParams

flags.DEFINE_string("model", "tiny-llama", "checkpoint directory or preset name")
flags.DEFINE_multi_string("prompt", ["Hello, nanoflow!"], "prompt text (repeat for several)")
flags.DEFINE_bool("chat", False, "wrap each prompt as a user message in the chat template")
flags.DEFINE_integer("max_tokens", 32, "tokens to generate per prompt", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("top_k", 0, "0 = no top-k")
flags.DEFINE_integer("n", 1, "samples per prompt")
flags.DEFINE_integer("seed", None, "sampling seed (None: random)")
flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16 | float16")
flags.DEFINE_integer("max_num_batched_tokens", 256, "dense batch: tokens per iteration")
flags.DEFINE_integer("max_model_len", 1024, "prompt + output tokens per sequence")
F = flags.FLAGS


def main(argv):
    del argv
    t0 = time.perf_counter()
    llm = LLM(F.model, dtype=F.dtype, max_num_batched_tokens=F.max_num_batched_tokens,
              max_model_len=F.max_model_len)
    print(f"engine ready in {time.perf_counter() - t0:.1f}s")
    prompts = F.prompt
    if F.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(n=F.n, temperature=F.temperature, top_p=F.top_p, top_k=F.top_k,
                            seed=F.seed, max_tokens=F.max_tokens)
    for prompt, out in zip(F.prompt, llm.generate(prompts, params)):
        for o in out.outputs:
            print(f"{prompt!r} -> {o.text!r} ({len(o.token_ids)} tokens, {o.finish_reason})")


if __name__ == "__main__":
    app.run(main)

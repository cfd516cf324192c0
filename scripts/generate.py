"""Generate from the command line with any checkpoint directory or preset.

    python scripts/generate.py                                   # tiny-llama, random weights
    python scripts/generate.py --model=/path/to/Llama-3-8B-Instruct --chat
        --prompt="What is the capital of France?" --max_tokens=64

Presets have random weights and the built-in byte-level tokenizer, so their text is noise:
they exist to exercise the code path and to measure speed. The engine flags are
EngineConfig's, the same in every script.
"""
import logging
import time

from absl import flags

from nanoflow_jax import cli

cli.define_engine_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_multi_string("prompt", ["Hello, nanoflow!"], "prompt text (repeat for several)")
flags.DEFINE_bool("chat", False, "wrap each prompt as a user message in the chat template")
flags.DEFINE_integer("max_tokens", 32, "tokens to generate per prompt", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("top_k", 0, "0 = no top-k")
flags.DEFINE_integer("n", 1, "samples per prompt")
flags.DEFINE_integer("sampling_seed", None, "sampling seed (default: random)")
F = flags.FLAGS


def main(argv):
    del argv
    config = cli.engine_config()
    cli.setup(config)
    from nanoflow_jax import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(config=config)
    logging.info("engine ready in %.1fs", time.perf_counter() - t0)
    prompts = F.prompt
    if F.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(n=F.n, temperature=F.temperature, top_p=F.top_p, top_k=F.top_k,
                            seed=F.sampling_seed, max_tokens=F.max_tokens)
    for prompt, out in zip(F.prompt, llm.generate(prompts, params, use_tqdm=False)):
        for o in out.outputs:
            print(f"{prompt!r} -> {o.text!r} ({len(o.token_ids)} tokens, {o.finish_reason})")


if __name__ == "__main__":
    cli.run(main)

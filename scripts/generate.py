"""Generate text greedily from a model directory or a preset (random weights).

    python scripts/generate.py                                  # tiny-llama on the CPU
    python scripts/generate.py --model=/path/to/Llama-3-8B --prompt="The capital of France is"

Presets have random weights and the built-in byte-level tokenizer, so their text is noise:
they exist to exercise the code path and measure speed.
"""
import os
import time

from absl import app, flags

import nanoflow_jax as nf
from nanoflow_jax.tokenizer import Tokenizer, byte_tokenizer

flags.DEFINE_string("model", "tiny-llama", "checkpoint directory or preset name")
flags.DEFINE_string("prompt", "Hello, nanoflow!", "prompt text")
flags.DEFINE_integer("max_tokens", 16, "tokens to generate", lower_bound=1)
flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16 | float16")
flags.DEFINE_integer("seed", 0, "random-weight seed for presets")
F = flags.FLAGS


def main(argv):
    del argv
    t0 = time.perf_counter()
    model = nf.load_model(F.model, dtype=F.dtype, seed=F.seed)
    has_tokenizer = os.path.isfile(os.path.join(F.model, "tokenizer.json"))
    tok = Tokenizer.from_pretrained(F.model) if has_tokenizer else byte_tokenizer()
    ids = tok.encode(F.prompt)
    print(f"loaded {F.model} ({model.config.param_count / 1e6:.1f}M params) "
          f"in {time.perf_counter() - t0:.1f}s; prompt has {len(ids)} tokens")
    out = []
    t0 = time.perf_counter()
    for _ in range(F.max_tokens):
        next_id = int(model.logits(ids + out)[-1].argmax())
        if next_id in tok.eos_token_ids:
            break
        out.append(next_id)
    dt = time.perf_counter() - t0
    print(f"{F.prompt!r} -> {tok.decode(out)!r}")
    print(f"{len(out)} tokens in {dt:.2f}s")


if __name__ == "__main__":
    app.run(main)

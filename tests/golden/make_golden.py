"""Write tiny random-weight HF checkpoints and their HF transformers logits (the goldens).

Run from the repo root when the model code's reference behaviour must be re-derived:
    pip install torch==2.13.0 transformers && python tests/golden/make_golden.py [NAME ...]
The tests read the checkpoints and `logits.npz` files and never import torch.
"""
import os
import sys

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
MODELS = {
    # llama3 rope scaling with a short original context so all three frequency bands occur.
    "llama": transformers.LlamaConfig(
        **COMMON, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    # A sliding window shorter than the prompts (logits: 40 tokens; greedy: up to 70 + 16).
    "mistral": transformers.MistralConfig(
        **{**COMMON, "num_key_value_heads": 1}, rope_theta=10000.0, sliding_window=16,
        tie_word_embeddings=False,
    ),
    # The window on layer 1 only: Qwen2 windows the layers from max_window_layers on.
    "qwen2": transformers.Qwen2Config(
        **COMMON, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=16, max_window_layers=1,
    ),
    # Top-2 of 4 experts, weights renormalised.
    "mixtral": transformers.MixtralConfig(
        **COMMON, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        num_local_experts=4, num_experts_per_tok=2,
    ),
    # Top-3 of 8 small experts, weights not renormalised, a gated shared expert, and a dense
    # MLP in layer 1 (mlp_only_layers).
    "qwen2_moe": transformers.Qwen2MoeConfig(
        **{**COMMON, "num_hidden_layers": 3}, rope_theta=1000000.0, tie_word_embeddings=False,
        use_sliding_window=False, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1],
    ),
}
GREEDY_PROMPT_LENS = (5, 37, 70)
GREEDY_NEW_TOKENS = 16
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def main(names):
    for i, (name, config) in enumerate(MODELS.items()):
        if names and name not in names:
            continue
        torch.manual_seed(i)
        config.architectures = [ARCH[name]]
        model = getattr(transformers, ARCH[name])(config).eval().float()
        with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them too
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif pname.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif pname.endswith("gate.weight"):  # routers, shared expert gate: decisive
                    p.copy_(0.3 * torch.randn_like(p))
                elif "expert" in pname:  # experts at unit gain, so the goldens weigh them
                    p.copy_(p.shape[-1] ** -0.5 * torch.randn_like(p))
        out_dir = os.path.join(HERE, name)
        model.save_pretrained(out_dir, safe_serialization=True)
        ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            logits = model(ids).logits[0].float().numpy()
        np.savez(os.path.join(out_dir, "logits.npz"), token_ids=ids[0].numpy(), logits=logits)
        # Greedy generate of prompts of several lengths, EOS off so every one runs the full length.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        gen = {}
        for j, n in enumerate(GREEDY_PROMPT_LENS):
            prompt = torch.randint(0, config.vocab_size, (1, n),
                                   generator=torch.Generator().manual_seed(100 + j))
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
            gen[f"prompt_{j}"] = prompt[0].numpy()
            gen[f"output_{j}"] = out[0, n:].numpy()
        np.savez(os.path.join(out_dir, "greedy.npz"), **gen)
        print(name, transformers.__version__, logits.shape)


if __name__ == "__main__":
    main(sys.argv[1:])  # model names (default: all)

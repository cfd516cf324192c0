"""Request text to prompt token ids, bounded before tokenizing and run off the event loop.

A prompt longer than `max_chars` characters cannot fit in `max_model_len` tokens, so it is
refused in O(1) before the tokenizer sees it (and a body longer than `max_body_bytes` before
it is even parsed: `body_limit`) (a 10 MB prompt would hold the tokenizer for
seconds). The bound: no token of the vocabulary (added tokens included) spells more than
`max_token_chars` characters, so a text of C characters is at least C / max_token_chars tokens;
CHARS_SAFETY more covers normalizers that shorten the text (NFC composes up to 3 jamo into one
Hangul syllable). Prompts under the bound are checked for lone surrogates (valid JSON, not
valid text: the tokenizer would raise TypeError) and tokenized by `encode`, meant to run in a
worker thread: `tokenizers`' batch entry point releases the GIL while it works, its single-text
`encode` does not.
"""
from __future__ import annotations

from collections.abc import Sequence

import jinja2

from nanoflow_jax.server.protocol import ChatMessage, bad_request
from nanoflow_jax.tokenizer import Tokenizer

CHARS_SAFETY = 4
# JSON spends at most 12 bytes on one character (an escaped surrogate pair, "\ud83d\ude00").
JSON_BYTES_PER_CHAR = 12
# Per token of context, for what a body holds besides the prompt's characters (a message's
# {"role": ..., "content": ...} costs at least one template token; a token id, ~8 bytes).
JSON_BYTES_PER_TOKEN = 64
BODY_SLACK_BYTES = 1 << 20  # other fields: stop strings, user, fields the server ignores


def max_token_chars(tokenizer: Tokenizer) -> int:
    """The longest spelling of any token, in characters (an upper bound on what one decodes
    to: byte-level vocabularies spell a byte per character, byte fallback six per byte)."""
    return max(map(len, tokenizer.hf.get_vocab(with_added_tokens=True)), default=1) or 1


def check_text(text: str, param: str) -> None:
    """400 unless `text` is valid Unicode (no lone UTF-16 surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid text: it holds a lone surrogate "
                          f"(U+{ord(text[e.start]):04X}) at character {e.start}", param,
                          "invalid_unicode") from None


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """`Tokenizer.encode`, through the entry point that releases the GIL."""
    batch = getattr(tokenizer.hf, "encode_batch_fast", tokenizer.hf.encode_batch)
    ids = batch([text], add_special_tokens=add_special_tokens)[0].ids
    bos = tokenizer.bos_token_id
    if (add_special_tokens and tokenizer.config.add_bos_token and bos is not None
            and ids[:1] != [bos]):  # as Tokenizer.encode: BOS once, if the post-processor didn't
        ids = [bos] + ids
    return ids


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = max_model_len * max_token_chars(tokenizer) * CHARS_SAFETY
        # No body larger than this can hold a prompt that fits (checked before parsing).
        self.max_body_bytes = (self.max_chars * JSON_BYTES_PER_CHAR
                               + max_model_len * JSON_BYTES_PER_TOKEN + BODY_SLACK_BYTES)

    # ---- on the event loop: O(1) ------------------------------------------------------------

    def check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_chars:
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens, and the "
                f"{param} has {num_chars} characters: more than any {self.max_model_len} "
                f"tokens can spell (at most {self.max_chars})", param,
                "context_length_exceeded")

    @staticmethod
    def chat_chars(messages: Sequence[ChatMessage]) -> int:
        return sum(len(m.text()) + len(m.name or "") for m in messages)

    # ---- in a worker thread --------------------------------------------------------------------

    def completion(self, text: str) -> list[int]:
        check_text(text, "prompt")
        return encode(self.tokenizer, text)

    def chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool
             ) -> tuple[list[int], str]:
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    check_text(part.text, f"messages.{i}.content.{j}.text")
            elif m.content:
                check_text(m.content, f"messages.{i}.content")
            if m.name:
                check_text(m.name, f"messages.{i}.name")
        rendered = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                rendered, add_generation_prompt=add_generation_prompt)
        except (ValueError, jinja2.TemplateError) as e:
            raise bad_request(f"the chat template failed: {e}", "messages") from None
        check_text(text, "messages")
        ids = encode(self.tokenizer, text, add_special_tokens=False)  # the template wrote BOS
        if not ids:
            raise bad_request("the rendered chat prompt is empty", "messages")
        return ids, text


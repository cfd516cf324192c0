"""`server.prompts`: the character bound, lone surrogates, and tokenizing without the GIL."""
from __future__ import annotations

import threading
import time

import pytest

from nanoflow_jax.server.prompts import (CHARS_SAFETY, PromptEncoder, check_text, encode,
                                         max_token_chars)
from nanoflow_jax.server.protocol import APIError, ChatMessage
from nanoflow_jax.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()


def test_max_token_chars_bounds_every_token():
    longest = max_token_chars(TOKENIZER)
    assert longest == len("<pad>")  # the added tokens are the longest spellings here
    for i in range(TOKENIZER.vocab_size):
        assert len(TOKENIZER.decode([i], skip_special_tokens=False)) <= longest


def test_char_bound_refuses_only_what_cannot_fit():
    enc = PromptEncoder(TOKENIZER, max_model_len=100)
    assert enc.max_chars == 100 * 5 * CHARS_SAFETY
    enc.check_chars(enc.max_chars, "prompt")  # may fit: tokenized and checked in tokens
    with pytest.raises(APIError) as e:
        enc.check_chars(enc.max_chars + 1, "prompt")
    assert e.value.status == 400 and e.value.param == "prompt"
    assert e.value.code == "context_length_exceeded"
    # The densest text (special tokens spelled out) still needs more tokens than the bound
    # lets through chars / max_token_chars.
    dense = "<pad>" * 100
    assert len(encode(TOKENIZER, dense)) >= len(dense) // max_token_chars(TOKENIZER)
    msgs = [ChatMessage(role="user", content="abc", name="bob"),
            ChatMessage(role="user", content=[{"type": "text", "text": "de"}])]
    assert PromptEncoder.chat_chars(msgs) == 3 + 3 + 2


@pytest.mark.parametrize("text,pos", [("\ud800", 0), ("ok \udfff", 3), ("a\udc00b", 1)])
def test_lone_surrogates_are_400(text, pos):
    with pytest.raises(APIError) as e:
        check_text(text, "messages.0.content")
    assert e.value.status == 400 and e.value.param == "messages.0.content"
    assert f"at character {pos}" in e.value.message
    check_text("fine: é 世界 \U0001F600", "prompt")  # a real pair (astral) is fine


def test_chat_names_the_part_with_a_surrogate():
    enc = PromptEncoder(TOKENIZER, max_model_len=100)
    msgs = [ChatMessage(role="user", content="fine"),
            ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                              {"type": "text", "text": "\ud800"}])]
    with pytest.raises(APIError) as e:
        enc.chat(msgs, True)
    assert e.value.param == "messages.1.content.1.text"


def test_encode_matches_tokenizer_encode():
    for text in ["Hello", "<s>already", "é 世界", " spaces  "]:
        for special in (True, False):
            assert encode(TOKENIZER, text, special) == TOKENIZER.encode(text, special)


def test_encode_releases_the_gil():
    """While a thread tokenizes a long text, this thread keeps running."""
    text = "hello world " * 50_000
    gaps: list[float] = []
    worker = threading.Thread(target=encode, args=(TOKENIZER, text))
    t0 = last = time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    took = time.perf_counter() - t0
    assert took > 0.02, took  # long enough to tell
    assert max(gaps) < 0.5 * took, (max(gaps), took)

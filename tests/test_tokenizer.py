"""Tokenizer tests: a small byte-level BPE is trained here, so nothing is downloaded."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from nanoflow_jax.tokenizer import IncrementalDetokenizer, Tokenizer, byte_tokenizer

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "héllo wörld 你好 🙂",
    "serving large language models at high throughput",
] * 20
MULTIBYTE = "héllo wörld 你好世界 🙂🚀 naïve café ∑ 𝔘𝔫𝔦"  # 2-, 3- and 4-byte characters

CHATML = (
    "{{ bos_token }}{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def train_bpe(bos_post_processor: bool = False) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    # Few merges, so the CJK characters and emoji stay split over several byte tokens.
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    if bos_post_processor:
        hf.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    return hf


def write_checkpoint(path, hf, config=None, generation_config=None):
    hf.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return str(path)


BASE_CONFIG = {
    "bos_token": {"content": "<s>", "lstrip": False},  # AddedToken form
    "eos_token": "<|im_end|>",
    "pad_token": "<pad>",
    "add_bos_token": True,
    "chat_template": CHATML,
}


@pytest.fixture
def tok(tmp_path):
    return Tokenizer.from_pretrained(write_checkpoint(tmp_path, train_bpe(), BASE_CONFIG))


@pytest.mark.parametrize("text", ["hello world", MULTIBYTE, "🙂", "a\nb\tc  d"])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # With specials: BOS is added and then skipped (or kept) on decode.
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_special_token_ids(tok):
    hf = tok.hf
    assert tok.bos_token_id == hf.token_to_id("<s>")
    assert tok.pad_token_id == hf.token_to_id("<pad>")
    assert tok.eos_token_ids == frozenset({hf.token_to_id("<|im_end|>")})
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True) == 300
    assert tok.chat_template == CHATML


def test_bos_added_once(tmp_path):
    # add_bos_token is set AND the post-processor adds BOS: only one must come out.
    tok = Tokenizer.from_pretrained(
        write_checkpoint(tmp_path, train_bpe(bos_post_processor=True), BASE_CONFIG))
    bos = tok.bos_token_id
    ids = tok.encode("hello")
    assert ids[0] == bos and ids[1] != bos
    assert ids[1:] == tok.encode("hello", add_special_tokens=False)
    assert bos not in tok.encode("hello", add_special_tokens=False)


def test_no_bos_without_config(tmp_path):
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path, train_bpe(), {"bos_token": "<s>"}))
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)
    assert tok.bos_token_id not in tok.encode("hello")


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🙂"}]
    convo = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo 🙂<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == convo
    prompt = tok.apply_chat_template(messages)
    assert prompt == convo + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == tok.encode(prompt, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.hf.token_to_id("<|im_start|>")) == 3  # special markers are single ids


def test_chat_template_globals_and_extra_vars(tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                "{{ strftime_now('%Y') | length }}|{{ greeting }}|{{ {'k': 'ü'} | tojson }}")
    cfg = dict(BASE_CONFIG, chat_template=[{"name": "tool_use", "template": "x"},
                                           {"name": "default", "template": template}])
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path, train_bpe(), cfg))
    out = tok.apply_chat_template([{"role": "user", "content": ""}], greeting="hi")
    assert out == '4|hi|{"k": "ü"}'
    with pytest.raises(Exception, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": ""}])


def test_chat_template_whitespace_like_hf(tmp_path):
    # HF renders with trim_blocks + lstrip_blocks: indented block tags leave no whitespace.
    template = ("{% for m in messages %}\n"
                "  {% if m['role'] == 'user' %}\n"
                "U: {{ m['content'] }}\n"
                "  {% endif %}\n"
                "{% endfor %}")
    tok = Tokenizer.from_pretrained(
        write_checkpoint(tmp_path, train_bpe(), dict(BASE_CONFIG, chat_template=template)))
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    assert tok.apply_chat_template(messages) == "U: a\n"


def test_missing_chat_template(tmp_path):
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path, train_bpe()))
    assert tok.chat_template is None and tok.bos_token_id is None
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("gen_eos", [[4, 1], 1])
def test_generation_config_eos_merged(tmp_path, gen_eos):
    tok = Tokenizer.from_pretrained(
        write_checkpoint(tmp_path, train_bpe(), BASE_CONFIG, {"eos_token_id": gen_eos}))
    im_end = tok.hf.token_to_id("<|im_end|>")
    assert im_end == 4  # the config's eos, also listed in generation_config: counted once
    assert tok.eos_token_ids == frozenset({im_end, 1})


def stream(tok, ids, **kw):
    detok = IncrementalDetokenizer(tok, **kw)
    return [detok.add([i]) for i in ids], detok


def test_incremental_detokenizer(tok):
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    # The test only means something if some tokens hold part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == MULTIBYTE == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # something was held back
    assert detok.flush() == ""


def test_incremental_detokenizer_window_stays_small(tok):
    ids = tok.encode(MULTIBYTE * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    longest = 0
    for i in ids:
        detok.add([i])
        longest = max(longest, len(detok._window))
    assert detok.text == MULTIBYTE * 20
    assert longest <= 8  # O(1) per token: the window never grows with the output


def test_incremental_detokenizer_special_tokens_and_prompt(tok):
    prompt = tok.encode("hello")
    ids = tok.encode(" wörld 你好", add_special_tokens=False) + [tok.hf.token_to_id("<|im_end|>")]
    deltas, _ = stream(tok, ids, prompt_ids=prompt)
    assert "".join(deltas) == " wörld 你好"  # the prompt is context, not output
    deltas, _ = stream(tok, ids, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(deltas) == " wörld 你好<|im_end|>"


def test_incremental_detokenizer_flush_incomplete(tok):
    ids = tok.encode("ok 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:-1]) == "ok "  # the emoji's last byte is missing
    assert detok.flush() == tok.decode(ids[:-1])[len("ok "):]
    assert detok.text.startswith("ok ") and detok.text.endswith("\ufffd")


def test_byte_tokenizer():
    tok = byte_tokenizer()
    assert tok.vocab_size == 259 <= 512
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert ids == list(MULTIBYTE.encode("utf-8"))  # id b is byte b
    assert tok.decode(ids) == MULTIBYTE
    assert tok.encode("hi") == [tok.bos_token_id, ord("h"), ord("i")]
    assert tok.eos_token_ids == frozenset({257}) and tok.pad_token_id == 258
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    deltas, _ = stream(tok, tok.encode(MULTIBYTE, add_special_tokens=False))
    assert "".join(deltas) == MULTIBYTE and not any("\ufffd" in d for d in deltas)


def test_save_pretrained_round_trip(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(str(tmp_path / "ckpt"))
    loaded = Tokenizer.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == tok.config
    for text in ["hello", MULTIBYTE]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    messages = [{"role": "user", "content": "héllo"}]
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_batched_detokenization_equals_one_at_a_time(tmp_path):
    from nanoflow_jax.tokenizer import detokenize_step

    tok = byte_tokenizer()
    rng = np.random.default_rng()
    texts = ["héllo wörld 你好 🙂 " * 3, "plain ascii text", "🙂🙂🙂 ünïcödé", "a"]
    streams = [tok.encode(t, add_special_tokens=False) + [tok.bos_token_id] for t in texts]
    skips = [True, False, True, False]
    one = [IncrementalDetokenizer(tok, [65, 66], skip_special_tokens=s) for s in skips]
    many = [IncrementalDetokenizer(tok, [65, 66], skip_special_tokens=s) for s in skips]
    for step in range(max(map(len, streams))):
        live = [i for i, s in enumerate(streams) if step < len(s)]
        rng.shuffle(live)
        batch = detokenize_step([many[i] for i in live], [streams[i][step] for i in live])
        for i, delta in zip(live, batch):
            assert delta == one[i].add([streams[i][step]])
    assert [d.text for d in many] == [d.text for d in one]
    assert "\ufffd" not in "".join(d.text for d in many)


def test_detokenize_step_equals_one_decode_with_memo_and_skipped_ids(tok):
    """Many streams of multi-byte characters split over tokens, with ids outside the
    vocabulary and special tokens mixed in: detokenize_step's text equals one decode of the
    whole output, with the pair memo cold and warm, and skipped ids never grow a window."""
    from nanoflow_jax.tokenizer import detokenize_step

    rng = np.random.default_rng(0)
    specials = [tok.hf.token_to_id(s) for s in SPECIALS]
    base = tok.encode(MULTIBYTE + " hello wörld", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in base)  # characters split over tokens
    streams = []
    for k in range(12):  # the first 4 begin with shuffled pieces: invalid UTF-8 too
        ids = [int(i) for i in rng.permutation(base)[:30]] * (k < 4) + list(base)
        for _ in range(8):  # ids decode skips (outside the vocabulary) and special tokens
            extra = int(rng.choice([tok.vocab_size, tok.vocab_size + 7, 10**6, *specials]))
            ids.insert(int(rng.integers(len(ids) + 1)), extra)
        streams.append(ids)
    for skip in (True, False):
        for _ in range(2):  # a cold memo, then a warm one
            detoks = [IncrementalDetokenizer(tok, [7], skip_special_tokens=skip)
                      for _ in streams]
            longest = 0
            for step in range(max(map(len, streams))):
                live = [i for i, s in enumerate(streams) if step < len(s)]
                deltas = detokenize_step([detoks[i] for i in live],
                                         [streams[i][step] for i in live])
                assert not any(d.endswith("\ufffd") for d in deltas)  # held back, not emitted
                longest = max(longest, *(len(d._window) for d in detoks[4:]))
            for d, ids in zip(detoks, streams):
                d.flush()
                assert d.text == tok.decode(ids, skip_special_tokens=skip)
            # The last emitted tokens and those of incomplete characters (more where a special
            # token splits one), never the ~60 of a stream.
            assert longest <= 12
        assert tok._pair_deltas[skip]  # the memo answered the second pass
    many = IncrementalDetokenizer(tok)
    many.add([tok.vocab_size + 1] * 1000 + [specials[1]] * 1000)
    assert many._window == [] and many.text == ""  # skipped ids leave no trace

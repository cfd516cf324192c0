"""Tokenizer: HF `tokenizers` + the chat template (jinja2) + incremental detokenization.

`Tokenizer.from_pretrained(dir)` reads the files an HF checkpoint ships (`tokenizer.json`,
`tokenizer_config.json`, `generation_config.json`); `byte_tokenizer()` builds a 259-token
byte-level tokenizer in code so random-weight presets can serve text with nothing downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

REPLACEMENT_CHAR = "\ufffd"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """What `tokenizer_config.json` (+ `generation_config.json`) adds to `tokenizer.json`."""
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False       # prepend BOS unless the post-processor already did
    chat_template: str | None = None
    extra_eos_token_ids: tuple[int, ...] = ()  # from generation_config.json

    @classmethod
    def from_dir(cls, path: str) -> "TokenizerConfig":
        """Parses the optional config files in `path`; missing files give defaults."""
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        eos_ids = gen.get("eos_token_id")
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        return cls(
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            pad_token=_token_content(cfg.get("pad_token")),
            unk_token=_token_content(cfg.get("unk_token")),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            chat_template=_default_template(cfg.get("chat_template")),
            extra_eos_token_ids=tuple(int(i) for i in eos_ids or ()),
        )


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(tok: str | dict | None) -> str | None:
    # HF writes special tokens either as a plain string or as a serialized AddedToken.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _default_template(tpl: str | list | None) -> str | None:
    # Some checkpoints ship several named templates (e.g. "default", "tool_use").
    if isinstance(tpl, list):
        named = {t["name"]: t["template"] for t in tpl}
        return named.get("default")
    return tpl


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the special tokens and chat template of a checkpoint."""

    def __init__(self, hf: tokenizers.Tokenizer, config: TokenizerConfig = TokenizerConfig()):
        self.hf = hf
        self.config = config
        self._template: jinja2.Template | None = None  # compiled on first use
        self._special_ids: frozenset[int] | None = None  # skipped_ids(True), on first use
        # {skip_special_tokens: {(emitted id, new id): text delta}}: detokenize_step's memo.
        self._pair_deltas: dict[bool, dict[tuple[int, int], str]] = {True: {}, False: {}}

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Loads a tokenizer from an HF checkpoint directory."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r} (looked for {tok_file!r})")
        return cls(tokenizers.Tokenizer.from_file(tok_file), TokenizerConfig.from_dir(path))

    def save_pretrained(self, path: str) -> None:
        """Writes `tokenizer.json` + `tokenizer_config.json`, readable by `from_pretrained`.

        `extra_eos_token_ids` are not written: they belong to the model's generation_config.json.
        """
        os.makedirs(path, exist_ok=True)
        self.hf.save(os.path.join(path, "tokenizer.json"))
        c = self.config
        cfg = {
            "bos_token": c.bos_token, "eos_token": c.eos_token,
            "pad_token": c.pad_token, "unk_token": c.unk_token,
            "add_bos_token": c.add_bos_token, "chat_template": c.chat_template,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2,
                      ensure_ascii=False)

    # --- special tokens ------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.config.bos_token)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation (Llama-3 instruct has both <|end_of_text|> and <|eot_id|>)."""
        ids = set(self.config.extra_eos_token_ids)
        eos = self._id(self.config.eos_token)
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    def skipped_ids(self, skip_special_tokens: bool) -> frozenset[int]:
        """Ids in the vocabulary that `decode` drops: the special tokens when skipping them."""
        if not skip_special_tokens:
            return frozenset()
        if self._special_ids is None:
            self._special_ids = frozenset(
                i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.config.pad_token)

    @property
    def chat_template(self) -> str | None:
        return self.config.chat_template

    # --- encode / decode -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → ids; the tokenizer.json post-processor adds its special tokens (if asked)."""
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        # `add_bos_token` comes from the slow-tokenizer world; many tokenizer.json files already
        # add BOS in their post-processor, and adding it twice hurts generation quality.
        if add_special_tokens and self.config.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # int(): ids often arrive as numpy integers, which `tokenizers` rejects.
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- chat ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            **extra: Any) -> str | list[int]:
        """Renders `messages` ([{"role", "content"}, ...]) with the checkpoint's template."""
        if self._template is None:
            if self.chat_template is None:
                raise ValueError("this tokenizer has no chat_template (tokenizer_config.json "
                                 "has none); pass a prompt string instead of messages")
            self._template = _compile_template(self.chat_template)
        text = self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.config.bos_token or "", eos_token=self.config.eos_token or "",
            pad_token=self.config.pad_token or "", unk_token=self.config.unk_token or "",
            **extra)
        # The template writes BOS itself, so the encoder must not add another.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes and sorts keys; templates (tool schemas) expect HF's.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    """Compiles a chat template the way transformers does, so outputs match HF byte for byte."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a request's stream of generated ids into text deltas; one per request.

    Decoding each token alone is wrong (byte-level tokens can split a UTF-8 character,
    sentencepiece drops the leading space of a lone token) and re-decoding the whole output
    each step is O(length). So decode only a small window: tokens[prefix:read] were already
    emitted, tokens[prefix:] is the window; the new text is the difference of the two decodes.
    A delta ending in U+FFFD means a character is still incomplete: hold it back.

    Ids that `decode` skips (ids outside the vocabulary, special tokens when
    skip_special_tokens) never enter the window: they add no text, and a model that samples
    many of them (random weights over a small tokenizer) would otherwise grow the window
    without bound. The window then holds the last emitted tokens plus those of an incomplete
    character: O(1) work per token.
    """

    __slots__ = ("_pairs", "_read", "_skipped", "_vocab_size", "_window", "skip_special_tokens",
                 "text", "tokenizer")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True, context: int = 5):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = tokenizer.skipped_ids(skip_special_tokens)
        self._vocab_size = tokenizer.vocab_size
        self._pairs = tokenizer._pair_deltas[skip_special_tokens]
        # A few prompt tokens as context, so the first output token decodes with its space.
        tail = [int(i) for i in list(prompt_ids)[-context:]] if context > 0 else []
        self._window = [i for i in tail if not self.skips(i)]
        self._read = len(self._window)  # window[:read] is already emitted (or is prompt)
        self.text = ""                  # everything emitted so far

    def skips(self, token_id: int) -> bool:
        """`decode` drops this id: it adds no text."""
        return token_id >= self._vocab_size or token_id in self._skipped

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: Iterable[int]) -> str:
        """Appends ids; returns the newly finalized text ("" while a character is incomplete)."""
        # One id at a time, so text before an incomplete character is not held back with it.
        return "".join(self._add_one(int(i)) for i in new_token_ids)

    def _add_one(self, token_id: int) -> str:
        if self.skips(token_id):
            return ""
        self._window.append(token_id)
        return self._accept(self._decode(self._window[:self._read]), self._decode(self._window))

    def _accept(self, prefix_text: str, full_text: str) -> str:
        """The delta of the window's two decodes, unless a character is still incomplete."""
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = full_text[len(prefix_text):]
        # Slide: the just-emitted tokens become the next window's context.
        del self._window[:self._read]
        self._read = len(self._window)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: emits whatever was held back, U+FFFD included."""
        if self._read == len(self._window):
            return ""
        prefix_text = self._decode(self._window[:self._read])
        delta = self._decode(self._window)[len(prefix_text):]
        del self._window[:self._read]
        self._read = len(self._window)
        self.text += delta
        return delta


PAIR_MEMO_SIZE = 1 << 18  # most (emitted id, new id) pairs detokenize_step remembers


def detokenize_step(detoks: Sequence[IncrementalDetokenizer], token_ids: Sequence[int]
                    ) -> list[str]:
    """`detoks[i].add([token_ids[i]])` for many requests at once: the engine's per-step path
    when it keeps text. Ids that decode skips cost nothing. In the steady state a window is
    one emitted token and the new one, whose delta is a function of the pair alone: a memo
    per tokenizer (`PAIR_MEMO_SIZE` pairs, then cleared) answers the pairs seen before;
    the rest are decoded with two batched calls (per skip_special_tokens setting) instead of
    two calls per request."""
    deltas = [""] * len(detoks)
    misses: dict[bool, list[int]] = {True: [], False: []}  # per setting: indices of detoks
    for i, (d, t) in enumerate(zip(detoks, token_ids)):
        t = int(t)
        if t >= d._vocab_size or t in d._skipped:
            continue
        window = d._window
        if d._read == 1 == len(window):
            delta = d._pairs.get((window[0], t))
            if delta is not None:  # as _accept would: emit and slide, or hold ("")
                if delta:
                    window[0] = t
                    d.text += delta
                    deltas[i] = delta
                else:
                    window.append(t)
                continue
        window.append(t)
        misses[d.skip_special_tokens].append(i)
    for skip, group in misses.items():
        if not group:
            continue
        live = [detoks[i] for i in group]
        hf = live[0].tokenizer.hf
        prefixes = hf.decode_batch([d._window[:d._read] for d in live], skip_special_tokens=skip)
        fulls = hf.decode_batch([d._window for d in live], skip_special_tokens=skip)
        pairs = live[0]._pairs
        if len(pairs) + len(live) > PAIR_MEMO_SIZE:
            pairs.clear()
        for i, d, prefix_text, full_text in zip(group, live, prefixes, fulls):
            window = d._window
            pair = (window[0], window[1]) if d._read == 1 and len(window) == 2 else None
            deltas[i] = d._accept(prefix_text, full_text)
            if pair is not None:
                pairs[pair] = deltas[i]
    return deltas


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable char map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control chars and spaces are moved above 255 so every byte is visible
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """A 259-token byte-level tokenizer built in code: id b = byte b, then <s>, </s>, <pad>.

    Any text round-trips exactly; meant for tiny random-weight presets, not for quality.
    """
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges, word splitting changes nothing but costs time.
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                           use_regex=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens(["<s>", "</s>", "<pad>"])
    config = TokenizerConfig(bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                             add_bos_token=True, chat_template=BYTE_CHAT_TEMPLATE)
    return Tokenizer(hf, config)

"""The OpenAI-compatible server, end to end: the real `scripts/serve.py` in a subprocess, driven
by the official `openai` client (and raw httpx where the client would hide the wire format).

Two servers start in parallel once per module: `main` (tiny-llama, CPU knobs) and `guarded`
(--api_key, --max_queue=2, two running sequences, a 1 s drain) for auth, overload and SIGTERM.
The engine-thread failure and drain-timeout paths are tested in-process on a fake engine.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import types

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoflow_jax.engine.outputs import CompletionOutput, RequestOutput
from nanoflow_jax.sampling_params import MAX_N, SamplingParams
from nanoflow_jax.tokenizer import byte_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
API_KEY = "test-key"
MAX_MODEL_LEN = 512  # the main server's (below tiny-llama's context of 1024)
GUARDED_MAX_MODEL_LEN = 1024
VOCAB_SIZE = 512  # tiny-llama's


# ---- the server processes -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, log_path: pathlib.Path, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), f"--port={self.port}",
             "--noaccess_log", *flags],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 240.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def client(self, api_key: str | None = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed `name` or `name{label=value,...}` (model_name
        left out)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                  if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Polls /metrics until no request runs or waits and no KV page is in use."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["nanoflow_kv_pages_used"] == 0 and m["nanoflow_num_requests_running"] == 0
                    and m["nanoflow_num_requests_waiting"] == 0)
            if idle:
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"the server is not idle after {timeout}s: "
                            f"{ {k: v for k, v in m.items() if 'num_requests' in k or 'kv' in k} }")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second one skips the drain
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def _processes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("server_logs")
    procs = {
        "main": ServerProcess(logs / "main.log", "--max_num_seqs=64",
                              f"--max_model_len={MAX_MODEL_LEN}"),
        "guarded": ServerProcess(
            logs / "guarded.log", f"--api_key={API_KEY}", "--max_queue=2", "--max_num_seqs=2",
            "--max_prefill_seqs=2", "--max_num_batched_tokens=16",
            f"--max_model_len={GUARDED_MAX_MODEL_LEN}", "--drain_timeout_s=1",
            "--served_model_name=guarded"),
    }
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def server(_processes) -> ServerProcess:
    return _processes["main"].wait_ready()


@pytest.fixture(scope="module")
def guarded(_processes) -> ServerProcess:
    return _processes["guarded"].wait_ready()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


TOKENIZER = byte_tokenizer()  # what tiny-llama serves with


def _greedy(**kw):
    return dict(model=MODEL, temperature=0.0, **kw)


# ---- basic API ------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completion(client):
    out = client.completions.create(prompt="Hello", max_tokens=8,
                                    extra_body={"ignore_eos": True}, **_greedy())
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert isinstance(choice.text, str) and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(TOKENIZER.encode("Hello")) == 6  # <s> + 5 bytes
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == 14
    # A list of token ids, and a batch of one prompt, are prompts too; greedy = deterministic.
    ids = TOKENIZER.encode("Hello")
    by_ids = client.completions.create(prompt=ids, max_tokens=8,
                                       extra_body={"ignore_eos": True}, **_greedy())
    batch_of_one = client.completions.create(prompt=["Hello"], max_tokens=8,
                                             extra_body={"ignore_eos": True}, **_greedy())
    assert by_ids.choices[0].text == batch_of_one.choices[0].text == choice.text
    assert by_ids.usage.prompt_tokens == 6


def test_chat(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is JAX?"}]
    out = client.chat.completions.create(messages=messages, max_completion_tokens=5,
                                         extra_body={"ignore_eos": True}, **_greedy())
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    want = len(TOKENIZER.apply_chat_template(messages, tokenize=True))
    assert out.usage.prompt_tokens == want
    assert out.usage.completion_tokens == 5
    # max_tokens (the older name) works too; text parts are joined.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What "},
                                          {"type": "text", "text": "is JAX?"}]}]
    out2 = client.chat.completions.create(messages=[messages[0]] + parts, max_tokens=5,
                                          extra_body={"ignore_eos": True}, **_greedy())
    assert out2.choices[0].message.content == choice.message.content


def test_streaming_completion(client):
    kw = dict(prompt="Streaming test", max_tokens=200, extra_body={"ignore_eos": True},
              **_greedy())
    full = client.completions.create(**kw)
    t0 = time.perf_counter()
    stream = client.completions.create(stream=True, stream_options={"include_usage": True},
                                       **kw)
    texts, times, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        (c,) = chunk.choices
        if c.text:
            texts.append(c.text)
            times.append(time.perf_counter() - t0)
        if c.finish_reason:
            finish = c.finish_reason
    assert "".join(texts) == full.choices[0].text
    assert finish == "length"
    assert usage.completion_tokens == 200 and usage.prompt_tokens == full.usage.prompt_tokens
    assert len(texts) >= 5, texts
    # The first piece comes long before the last: the text is streamed, not buffered.
    assert times[0] < 0.5 * times[-1], times


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "Stream a chat reply."}]
    kw = dict(messages=messages, max_tokens=60, extra_body={"ignore_eos": True}, **_greedy())
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 60
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3


def test_readme_demo(server):
    """The README's curl requests, as curl sends them (raw bodies, with and without a JSON
    Content-Type); the streaming chat one with the max_tokens the README gives it."""
    completion = '{"model": "tiny-llama", "prompt": "Hello, nanoflow!", "max_tokens": 16}'
    chat = ('{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi!"}], '
            '"stream": true, "max_tokens": 16}')
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for content_type in ("application/json", "application/x-www-form-urlencoded"):
            r = http.post("/v1/completions", content=completion,
                          headers={"Content-Type": content_type})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        with http.stream("POST", "/v1/chat/completions", content=chat,
                         headers={"Content-Type": "application/json"}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]
                if json.loads(e[6:])["choices"]]
    assert finishes[-1] in ("length", "stop") and len(events) <= 16 + 3


def test_n_samples(client):
    kw = dict(model=MODEL, prompt="Several samples", n=3, temperature=1.0, seed=7,
              max_tokens=12, extra_body={"ignore_eos": True})
    out = client.completions.create(**kw)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 36
    assert all(c.finish_reason == "length" for c in out.choices)
    again = client.completions.create(**kw)  # the same seed: the same samples
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    # Streaming: each chunk names its choice; per index the pieces join to the same text.
    texts = collections.defaultdict(str)
    finishes = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert dict(texts) == {c.index: c.text for c in out.choices}
    assert finishes == {0: "length", 1: "length", 2: "length"}


def _pick_stop(text: str) -> str:
    """A character from the second half of `text` (not U+FFFD) to use as a stop string."""
    for ch in text[len(text) // 2:]:
        if ch != "\ufffd" and ch.strip():
            return ch
    pytest.fail(f"no usable stop character in {text!r}")


def test_stop_strings(client):
    kw = dict(prompt="The quick brown fox", max_tokens=64, extra_body={"ignore_eos": True},
              **_greedy())
    full = client.completions.create(**kw).choices[0].text
    stop = _pick_stop(full)
    want = full[:full.index(stop)]
    out = client.completions.create(stop=[stop, "never-in-the-output"], **kw)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 64
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == want


def test_logprobs(client):
    out = client.completions.create(prompt="Logprobs", max_tokens=6, logprobs=2,
                                    extra_body={"ignore_eos": True}, **_greedy())
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True}, **_greedy())
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert entry.logprob <= lps[0] + 1e-6  # greedy picks the most likely token


# ---- load, disconnects, bad input --------------------------------------------------------------


def test_50_concurrent_clients(server, client):
    def one(i: int):
        max_tokens = 1 + i % 24
        kw = dict(model=MODEL, max_tokens=max_tokens, temperature=0.8, seed=i,
                  extra_body={"ignore_eos": True})
        if i % 3 == 0:
            out = client.chat.completions.create(
                messages=[{"role": "user", "content": f"client {i}"}], **kw)
            return max_tokens, out.usage.completion_tokens, out.choices[0].finish_reason
        if i % 3 == 1:
            out = client.completions.create(prompt=f"client {i} " * (1 + i % 7), **kw)
            return max_tokens, out.usage.completion_tokens, out.choices[0].finish_reason
        n, finish = 0, None
        for chunk in client.completions.create(prompt=f"streaming client {i}", stream=True,
                                               stream_options={"include_usage": True}, **kw):
            if chunk.usage:
                n = chunk.usage.completion_tokens
            elif chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return max_tokens, n, finish

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    elapsed = time.perf_counter() - t0
    assert all(got == want and finish == "length" for want, got, finish in results), results
    assert elapsed < 60
    server.wait_idle()


def test_client_disconnect_aborts_and_frees_pages(server):
    before = server.metrics()['nanoflow_requests_finished_total{finished_reason=abort}']
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": 480, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events, then hang up mid-stream
            assert any(line.startswith("data: {") for line in got)
        # A non-streaming request whose client gives up (times out) is aborted too.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**body, "stream": False, "n": 4}, timeout=0.3)
    m = server.wait_idle()
    assert m['nanoflow_requests_finished_total{finished_reason=abort}'] == before + 1 + 4


BAD_REQUESTS = [  # (path, body (dict or raw str), param)
    ("/v1/completions", '{"model": "tiny-llama", "prompt": ', None),  # malformed JSON
    ("/v1/completions", "[1, 2]", None),  # not an object
    ("/v1/completions", {"model": MODEL}, "prompt"),  # missing field
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "model"),  # unknown model
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
     "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -2}, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": MAX_N + 1}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 5}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 1.0},
     "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),  # empty prompts
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),  # batch > 1
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, "prompt"),  # not in the vocab
    ("/v1/completions", {"model": MODEL, "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * MAX_MODEL_LEN}, "prompt"),  # too long
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 50_000}, "prompt"),  # refused untokenized
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                            "content": "x" * 50_000}]},
     "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 2_000_000}, "prompt"),  # by body size
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 500, "max_tokens": 100}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                            "content": "x" * MAX_MODEL_LEN}]},
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 7}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, "messages"),
    # OpenAI's limits.
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [f"s{i}" for i in range(17)]},
     "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": VOCAB_SIZE + 1}, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": -1}, "top_logprobs"),
    # Lone surrogates: valid JSON, not valid text.
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": ["ok \\udfff"]}', "prompt"),
    ("/v1/chat/completions",
     '{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", ('{"model": "tiny-llama", "messages": [{"role": "user", "content": '
                              '[{"type": "text", "text": "a"}, {"type": "text", "text": '
                              '"\\udc00"}]}]}'), "messages.0.content.1.text"),
    ("/v1/chat/completions", ('{"model": "tiny-llama", "messages": [{"role": "user", "name": '
                              '"\\ud83d", "content": "x"}]}'), "messages.0.name"),
]


def test_bad_requests_get_400(server, client):
    failures = []
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, param in BAD_REQUESTS:
            if isinstance(body, str):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(path, json=body)
            try:
                err = r.json()["error"]
                ok = (r.status_code == 400 and set(err) == {"message", "type", "param", "code"}
                      and err["type"] == "invalid_request_error" and err["message"]
                      and err["param"] == param)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append((path, str(body)[:80], r.status_code, r.text[:300]))
    assert not failures, "\n".join(map(str, failures))
    # The official client maps them to BadRequestError.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", top_p=2.0)
    assert e.value.body["param"] == "top_p"
    # Nothing was queued and the server still works.
    assert httpx.get(f"{server.url}/health").status_code == 200
    out = client.completions.create(prompt="still fine", max_tokens=3,
                                    extra_body={"ignore_eos": True}, **_greedy())
    assert out.usage.completion_tokens == 3
    server.wait_idle()


def test_unknown_route_is_openai_shaped(server):
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_metrics_parse(server, client):
    client.completions.create(prompt="metrics", max_tokens=4, extra_body={"ignore_eos": True},
                              **_greedy())
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
            ("nanoflow_num_requests_running", "gauge"), ("nanoflow_num_requests_waiting", "gauge"),
            ("nanoflow_kv_pages_used", "gauge"), ("nanoflow_kv_pages_total", "gauge"),
            ("nanoflow_prompt_tokens", "counter"), ("nanoflow_generation_tokens", "counter"),
            ("nanoflow_prompt_throughput_tokens_per_second", "gauge"),
            ("nanoflow_generation_throughput_tokens_per_second", "gauge"),
            ("nanoflow_time_to_first_token_seconds", "histogram"),
            ("nanoflow_time_per_output_token_seconds", "histogram"),
            ("nanoflow_e2e_request_latency_seconds", "histogram"),
            ("nanoflow_requests_finished", "counter"),
            ("nanoflow_num_preemptions", "counter"),
            ("nanoflow_request_queue_time_seconds", "histogram")]:
        assert families[name].type == kind, name
    m = server.metrics()
    assert m["nanoflow_kv_pages_total"] > 0
    assert m["nanoflow_generation_tokens_total"] > 0 and m["nanoflow_prompt_tokens_total"] > 0
    assert m["nanoflow_generation_throughput_tokens_per_second"] > 0  # work in the last 10 s
    assert m["nanoflow_time_to_first_token_seconds_count"] > 0
    assert m["nanoflow_request_queue_time_seconds_count"] > 0
    assert m["nanoflow_num_preemptions_total"] >= 0
    assert m["nanoflow_time_per_output_token_seconds_count"] > 0
    assert m["nanoflow_requests_finished_total{finished_reason=length}"] > 0
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- the guarded server: API key, a full queue, SIGTERM -------------------------------------------


def test_api_key(guarded):
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{guarded.url}/v1/completions", headers=headers,
                       json={"model": "guarded", "prompt": "hi"})
        assert r.status_code == 401
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong-key").models.list()
    ok = guarded.client(api_key=API_KEY)
    assert [m.id for m in ok.models.list().data] == ["guarded"]
    out = ok.completions.create(model="guarded", prompt="hi", max_tokens=2,
                                extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # open, as /metrics
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


def _open_stream(client, **kw):
    return client.completions.create(model="guarded", prompt="queue", stream=True,
                                     extra_body={"ignore_eos": True}, **kw)


def test_full_queue_gets_503(guarded):
    client = guarded.client(api_key=API_KEY)
    long = dict(max_tokens=GUARDED_MAX_MODEL_LEN - 16)
    running = [_open_stream(client, **long) for _ in range(2)]  # max_num_seqs=2
    for s in running:
        next(iter(s))  # a first chunk: it runs
    waiting = [_open_stream(client, **long) for _ in range(2)]  # accepted: the queue is full
    try:
        deadline = time.monotonic() + 10
        while guarded.metrics()["nanoflow_num_requests_waiting"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="guarded", prompt="one too many", max_tokens=2)
        assert e.value.status_code == 503
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
        assert set(e.value.body) == {"message", "type", "param", "code"}
        m = guarded.metrics()
        assert m["nanoflow_requests_rejected_total{reason=queue_full}"] >= 1
    finally:
        for s in running + waiting:
            s.close()  # hang up: all four are aborted
    guarded.wait_idle()
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    out = client.completions.create(model="guarded", prompt="room again", max_tokens=2)
    assert len(out.choices) == 1


def test_sigterm_drains_then_exits(guarded):
    """Last test of the guarded server: it is gone afterwards."""
    client = guarded.client(api_key=API_KEY)
    short = _open_stream(client, max_tokens=60)
    next(iter(short))  # it runs
    # 16 samples of ~1000 tokens, 2 at a time: far longer than the 1 s drain timeout.
    endless = _open_stream(client, max_tokens=GUARDED_MAX_MODEL_LEN - 16, n=16)
    t0 = time.monotonic()
    guarded.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{guarded.url}/health").status_code == 200:  # draining: 503
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="guarded", prompt="too late", max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "draining"
    # The short request, mid-flight at the signal, runs to its end.
    assert [c.choices[0].finish_reason for c in short][-1] == "length"
    finishes = {}
    for chunk in endless:
        for c in chunk.choices:
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert sorted(finishes) == list(range(16))
    assert "abort" in finishes.values()  # the rest were aborted at the drain timeout
    assert guarded.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 15


# ---- in-process: the engine thread on a fake engine ----------------------------------------------


class FakeEngine:
    """LLMEngine's interface; one token per step; `fail_at_step` makes step() raise."""

    def __init__(self, fail_at_step: int | None = None, tokens_per_request: int | None = None,
                 max_num_seqs: int = 4):
        self.tokenizer = byte_tokenizer()
        self.max_model_len = 64
        self.model_config = types.SimpleNamespace(vocab_size=512)
        self.max_num_seqs = max_num_seqs  # only reported: the fake runs everything at once
        self.preempted_seqs = 0  # reported as waiting (ahead of new requests)
        self.generated_tokens = 0
        self.fail_at_step = fail_at_step
        self.tokens_per_request = tokens_per_request  # None: never finishes
        self.requests: dict[str, tuple[SamplingParams, list[int]]] = {}
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id, prompt, params, arrival_time=None):
        if not prompt["prompt_token_ids"]:
            raise ValueError("the prompt is empty")
        self.requests[request_id] = (params, [])

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def stats_snapshot(self):
        from nanoflow_jax.engine.stats_snapshot import StatsSnapshot

        seqs = sum(params.n for params, _ in self.requests.values())
        return StatsSnapshot(running_requests=len(self.requests), running_seqs=seqs,
                             waiting_seqs=self.preempted_seqs,
                             free_seq_slots=max(0, self.max_num_seqs - seqs), kv_pages_used=0,
                             kv_pages_total=8, generation_tokens=self.generated_tokens,
                             running_request_ids=frozenset(self.requests))

    def step(self):
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("simulated device failure")
        time.sleep(0.002)
        outs = []
        for rid, (params, ids) in list(self.requests.items()):
            ids.append(65)
            self.generated_tokens += 1
            done = self.tokens_per_request is not None and len(ids) >= self.tokens_per_request
            outs.append(RequestOutput(
                rid, None, [1], [CompletionOutput(i, "A" * len(ids), list(ids), None, None,
                                                  "length" if done else None)
                                 for i in range(params.n)],
                done, 0.0, time.time(), time.time() if done else None))
            if done:
                self.abort_request(rid)
        return outs


def test_engine_failure_fails_pending_with_500_and_health_503():
    from fastapi.testclient import TestClient

    from nanoflow_jax.server import AsyncEngine, ServerMetrics, create_app

    engine = AsyncEngine(FakeEngine(fail_at_step=3), max_queue=8, metrics=ServerMetrics("fake"))
    with TestClient(create_app(engine, "fake")) as http:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"model": "fake", "prompt": "hi",
                                               "max_tokens": 50})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "server_error"
        assert "simulated device failure" in r.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        r = http.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        m = http.get("/metrics").text
        assert 'nanoflow_requests_finished_total{finished_reason="error",model_name="fake"} 1.0' \
            in m


def test_drain_aborts_what_outlives_the_timeout_and_queue_is_bounded():
    from nanoflow_jax.server import AsyncEngine, DrainingError, QueueFullError

    async def main():
        fake = FakeEngine()  # requests never finish on their own
        engine = AsyncEngine(fake, max_queue=2)
        engine.start()
        params = SamplingParams(n=2, max_tokens=None)
        streams = []
        for i in range(2):
            s = engine.submit(f"r{i}", {"prompt_token_ids": [1]}, params, [1])
            await s.wait_accepted()
            streams.append(s)
        # max_num_seqs=4: r0 and r1 (n=2 each) take every slot. The bound is on requests
        # waiting for a slot, so fill the inbox faster than the thread empties it.
        with engine._cond:  # hold the engine thread off while queueing
            a = engine.submit("q1", {"prompt_token_ids": [1]}, params, [1])
            b = engine.submit("q2", {"prompt_token_ids": [1]}, params, [1])
            with pytest.raises(QueueFullError):
                engine.submit("q3", {"prompt_token_ids": [1]}, params, [1])
        await a.wait_accepted()
        await b.wait_accepted()
        bad = engine.submit("empty", {"prompt_token_ids": []}, params, [])
        with pytest.raises(ValueError):
            await bad.wait_accepted()
        t0 = time.monotonic()
        await engine.drain(0.2)
        assert 0.2 <= time.monotonic() - t0 < 5
        with pytest.raises(DrainingError):
            engine.submit("late", {"prompt_token_ids": [1]}, params, [1])
        for s in streams + [a, b]:
            outs = [o async for o in s]
            final = outs[-1]
            assert final.finished and [c.finish_reason for c in final.outputs] == ["abort"] * 2
            assert final.outputs[0].text.startswith("A")
        assert sorted(fake.aborted) == ["q1", "q2", "r0", "r1"]
        assert engine.num_active == 0 and engine.is_alive
        engine.shutdown()
        assert not engine._thread.is_alive()

    asyncio.run(main())


def test_max_queue_counts_only_requests_beyond_free_slots():
    """A burst on an idle engine with 64 free slots: 64 take the slots, max_queue=2 more wait,
    the next is refused. Each gets its queue time observed once it is scheduled."""
    from nanoflow_jax.server import AsyncEngine, QueueFullError, ServerMetrics

    async def main():
        fake = FakeEngine(max_num_seqs=64)
        metrics = ServerMetrics("fake")
        engine = AsyncEngine(fake, max_queue=2, metrics=metrics)
        engine.start()
        params = SamplingParams(max_tokens=None)
        with engine._cond:  # the whole burst arrives before the engine thread takes any
            streams = [engine.submit(f"b{i}", {"prompt_token_ids": [1]}, params, [1])
                       for i in range(66)]
            assert engine.num_queued == 2
            with pytest.raises(QueueFullError):
                engine.submit("b66", {"prompt_token_ids": [1]}, params, [1])
        for s in streams:
            await s.wait_accepted()
        deadline = time.monotonic() + 5
        count = "nanoflow_request_queue_time_seconds_count"
        while metrics.registry.get_sample_value(count, {"model_name": "fake"}) != 66:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert engine.num_queued == 0  # the fake runs everything: nothing waits
        engine.shutdown()

    asyncio.run(main())


def test_preempted_sequences_are_ahead_of_new_requests():
    """8 slots free but 6 preempted sequences wait for them: room for 2 new requests, then
    max_queue=2 wait, then 503."""
    from nanoflow_jax.server import AsyncEngine, QueueFullError

    fake = FakeEngine(max_num_seqs=8)
    fake.preempted_seqs = 6
    engine = AsyncEngine(fake, max_queue=2)
    # Not started, so nothing moves: the snapshot stays the one taken at construction.
    engine._thread = types.SimpleNamespace(is_alive=lambda: True)
    params = SamplingParams()
    for i in range(4):
        engine.submit(f"p{i}", {"prompt_token_ids": [1]}, params, [1])
    assert engine.num_queued == 2
    with pytest.raises(QueueFullError):
        engine.submit("p4", {"prompt_token_ids": [1]}, params, [1])


def test_idle_engine_thread_blocks():
    """No busy spin: an idle engine thread takes no steps and hardly any CPU."""
    from nanoflow_jax.server import AsyncEngine

    async def main():
        fake = FakeEngine(tokens_per_request=3)
        engine = AsyncEngine(fake)
        engine.start()
        s = engine.submit("a", {"prompt_token_ids": [1]}, SamplingParams(), [1])
        await s.wait_accepted()
        outs = [o async for o in s]
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == [65, 65, 65]
        steps = fake.steps
        cpu0 = time.process_time()
        await asyncio.sleep(0.3)
        idle_cpu = time.process_time() - cpu0
        assert fake.steps == steps
        assert idle_cpu < 0.1, idle_cpu  # all threads of this process
        engine.shutdown()

    asyncio.run(main())


def test_serve_script_flags():
    """`scripts/serve.py --help` lists the documented flags (absl, nothing imported heavy)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--helpfull"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    for flag in ("--model", "--dtype", "--max_num_batched_tokens", "--max_num_seqs",
                 "--max_model_len", "--page_size", "--num_pages", "--gpu_memory_utilization",
                 "--seed", "--host", "--port", "--api_key", "--max_queue",
                 "--served_model_name", "--drain_timeout_s", "--max_request_bytes"):
        assert flag in out.stdout, flag

"""The server under abuse, end to end (`scripts/serve.py` in a subprocess, as test_server.py):
huge bodies and prompts must not stall other clients, a burst fills the free slots before
anything queues, preemptions and queue times show in /metrics, and a second SIGTERM still
ends every request with a word.

One server, `tight`: 32 sequence slots but only 24 KV pages of 16 tokens (so long requests
preempt each other), --max_queue=2, a long drain (a second signal is what ends it).
"""
from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from test_server import ServerProcess

MODEL = "tiny-llama"
MAX_MODEL_LEN = 384
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("robust_logs") / "tight.log",
                         "--max_num_seqs=32", "--num_pages=24", "--max_queue=2",
                         f"--max_model_len={MAX_MODEL_LEN}", "--drain_timeout_s=60")
    yield proc.wait_ready()
    proc.stop()


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_huge_prompts_do_not_stall_health_or_streams(tight):
    """4 clients post huge prompts in a loop: each gets its 400 at once, while /health stays
    fast and a concurrent stream keeps streaming. 4 MB bodies are refused on their size alone
    (no prompt that fits takes that many bytes); 600 kB ones are parsed and refused on the
    prompt's characters, before tokenizing."""

    def completion(chars: int) -> bytes:
        return json.dumps({"model": MODEL, "prompt": "x" * chars, "max_tokens": 4}).encode()

    def chat(chars: int) -> bytes:
        return json.dumps({"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": "y" * chars}]}).encode()

    bodies = [("/v1/completions", completion(4_000_000)), ("/v1/completions", completion(600_000)),
              ("/v1/chat/completions", chat(4_000_000)), ("/v1/chat/completions", chat(600_000))]
    stop = threading.Event()
    answers: list[tuple[int, str | None, float]] = []

    def flood(i: int):
        path, body = bodies[i]
        with httpx.Client(base_url=tight.url, timeout=60) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
                answers.append((r.status_code, _error(r)["code"], time.perf_counter() - t0))

    gaps: list[float] = []

    def stream():
        body = {"model": MODEL, "prompt": "keep streaming", "max_tokens": 300,
                "ignore_eos": True, "temperature": 0.0, "stream": True}
        with httpx.Client(base_url=tight.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                last = None
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        floods = [pool.submit(flood, i) for i in range(4)]
        streamer = pool.submit(stream)
        health = []
        try:
            t_end = time.monotonic() + 4.0
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                assert httpx.get(f"{tight.url}/health", timeout=10).status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.05)
        finally:
            stop.set()
        for f in floods:
            f.result()
        streamer.result()
    assert len(answers) >= 4, answers
    assert {(status, code) for status, code, _ in answers} == {
        (400, "context_length_exceeded")}, answers
    assert max(t for _, _, t in answers) < 5.0, answers  # refused, not tokenized
    assert max(health) < 1.0, sorted(health)[-5:]
    assert len(gaps) >= 50 and max(gaps) < 1.0, sorted(gaps)[-5:]
    tight.wait_idle()


def test_body_over_the_cap_gets_413(tight):
    body = json.dumps({"model": MODEL, "prompt": "z" * (DEFAULT_MAX_REQUEST_BYTES + 1)})
    payload = body.encode()
    with httpx.Client(base_url=tight.url, timeout=60) as http:
        # Content-Length says it: refused before the body is read.
        r = http.post("/v1/completions", content=payload,
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:200]
        err = _error(r)
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"

        # No Content-Length (chunked): refused once the bytes received pass what any prompt
        # that fits could take (far below the cap here).
        def chunks():
            for i in range(0, len(payload), 1 << 20):
                yield payload[i:i + (1 << 20)]

        r = http.post("/v1/completions", content=chunks(),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"

        # A chunked body under the cap reaches the app whole.
        small = json.dumps({"model": MODEL, "prompt": "chunked", "max_tokens": 3,
                            "ignore_eos": True}).encode()
        r = http.post("/v1/completions", content=iter([small[:10], small[10:20], small[20:]]),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    # The official client sees an APIStatusError with the body.
    with pytest.raises(openai.APIStatusError) as e:
        tight.client().completions.create(model=MODEL, prompt="z" * DEFAULT_MAX_REQUEST_BYTES)
    assert e.value.status_code == 413
    assert httpx.get(f"{tight.url}/health").status_code == 200


def test_burst_fills_free_slots_before_queueing(tight):
    """--max_queue=2 bounds requests waiting for a slot, not those the 32 free slots take."""
    client = tight.client()

    def one(i: int):
        try:
            out = client.completions.create(model=MODEL, prompt=f"burst {i}", max_tokens=4,
                                            extra_body={"ignore_eos": True})
            return out.usage.completion_tokens
        except openai.APIStatusError as e:
            return e.status_code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    assert results == [4] * 24, results
    m = tight.wait_idle()
    assert m["nanoflow_requests_rejected_total{reason=queue_full}"] == 0
    assert m["nanoflow_request_queue_time_seconds_count"] >= 24


def test_preemptions_and_queue_time_in_metrics(tight):
    """Requests without max_tokens run to max_model_len (24 pages each, of the 24): the
    admission cannot project their growth, and the younger are preempted."""
    before = tight.metrics()
    client = tight.client()
    kw = dict(model=MODEL, temperature=0.0, extra_body={"ignore_eos": True, "max_tokens": None})
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda p: client.completions.create(prompt=p, **kw),
                             ["first long one", "second long one", "third long one"]))
    assert [o.usage.prompt_tokens + o.usage.completion_tokens for o in outs] == \
        [MAX_MODEL_LEN] * 3
    m = tight.wait_idle()
    assert m["nanoflow_num_preemptions_total"] > before["nanoflow_num_preemptions_total"]
    assert (m["nanoflow_request_queue_time_seconds_count"]
            == before["nanoflow_request_queue_time_seconds_count"] + 3)
    # Greedy output does not change with preemption (recompute).
    again = client.completions.create(prompt="first long one", **kw)
    assert again.choices[0].text == outs[0].choices[0].text


def test_second_sigterm_aborts_with_a_word(tight):
    """Last test of `tight`: a first SIGTERM starts a 60 s drain, a second one aborts what
    runs, and every client still gets a complete answer."""
    # No max_tokens: both requests are admitted at once (the admission projects only what a
    # request without max_tokens holds).
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": None, "ignore_eos": True}
    non_streaming: list[httpx.Response] = []

    def post():
        non_streaming.append(httpx.post(f"{tight.url}/v1/completions",
                                        json={**body, "n": 2}, timeout=60))

    poster = threading.Thread(target=post)
    with httpx.Client(base_url=tight.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # it runs
            poster.start()
            deadline = time.monotonic() + 20
            while tight.metrics()["nanoflow_num_requests_running"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            tight.proc.send_signal(signal.SIGTERM)
            while httpx.get(f"{tight.url}/health").status_code == 200:  # draining: 503
                assert time.monotonic() < deadline
                time.sleep(0.01)
            t0 = time.monotonic()
            tight.proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] == "abort" and finish.count("abort") == 1
    poster.join(30)
    (resp,) = non_streaming
    assert resp.status_code == 200, resp.text[:300]
    assert [c["finish_reason"] for c in resp.json()["choices"]] == ["abort", "abort"]
    assert tight.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 10

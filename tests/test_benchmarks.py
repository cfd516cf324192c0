"""The benchmark scripts, end to end on the CPU with tiny-llama and tiny workloads.

* scripts/benchmark_throughput.py with `--baseline=hf,hf-cb`: our engine and the HF transformers
  peers (nanoflow_jax/benchmarks/hf_baseline.py: static batches of `generate`, and transformers'
  continuous batching over a paged KV cache) on a constant workload and on a small trace of mixed
  lengths, in one process; the peers' exact lengths, settings and errors, in process.
* scripts/benchmark_serving.py with `--start_server`: two request rates against the real server.
* scripts/benchmark_serving.py against a stub server that refuses or stalls requests: failures
  are counted and never hang the run.
"""
from __future__ import annotations

import http.server
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (ContextTokens, GeneratedTokens): mixed lengths, so the baseline's batches need left padding
# and decode past some rows' ends.
TRACE_ROWS = [(5, 3), (20, 9), (7, 1), (33, 12), (12, 6), (3, 10)]
CB_TOKENS, CB_PAGE = 32, 16  # the continuous-batching peer's tokens per pass and page size


def _run(script: str, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{script} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc


# ---- offline throughput + the HF baseline ------------------------------------------------------


def _throughput(tmp, *args: str) -> list[dict]:
    with open(tmp / "splitwise.csv", "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        f.writelines(f"2023-11-16 18:15:{i:02d}.0,{n_in},{n_out}\n"
                     for i, (n_in, n_out) in enumerate(TRACE_ROWS))
    out = tmp / "throughput.json"
    _run("benchmark_throughput.py", "--model=tiny-llama", "--workload=const:16:8",
         "--workload=trace:splitwise", f"--trace_dir={tmp}", f"--num_requests={len(TRACE_ROWS)}",
         "--dtype=float32", "--max_num_batched_tokens=64", "--max_model_len=256",
         "--num_pages=128", f"--output_json={out}", *args)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def throughput(tmp_path_factory) -> list[dict]:
    """Ours, then the HF transformers peers, on each workload."""
    return _throughput(tmp_path_factory.mktemp("throughput"), "--baseline=hf,hf-cb",
                       "--baseline_batch_size=4", f"--baseline_max_batch_tokens={CB_TOKENS}",
                       f"--baseline_page_size={CB_PAGE}")


def test_throughput_of_ours_alone(tmp_path):
    results = _throughput(tmp_path)
    assert [r["workload"] for r in results] == ["const:16:8", "trace:splitwise"]
    for r in results:
        assert (r["prompt_tokens"], r["output_tokens"]) == EXPECTED[r["workload"]], r
        assert r["schedule"] == "sequential" and r["dense_batch"] == 64
        assert r["percent_of_optimal"] == pytest.approx(
            100 * r["total_tokens_per_s"] / r["optimal_tokens_per_s"])


def test_shipped_traces_load():
    from nanoflow_jax.benchmarks import workloads

    for name in workloads.TRACES:
        reqs = workloads.load_workload(f"trace:{name}", 100, max_model_len=2048, seed=1)
        assert len(reqs) == 100
        assert all(r.prompt_len >= 1 and 1 <= r.output_len and
                   r.prompt_len + r.output_len <= 2048 for r in reqs)
        assert len({(r.prompt_len, r.output_len) for r in reqs}) > 10  # real, varied lengths


EXPECTED = {  # workload: (prompt tokens, output tokens)
    "const:16:8": (16 * len(TRACE_ROWS), 8 * len(TRACE_ROWS)),
    "trace:splitwise": (sum(r[0] for r in TRACE_ROWS), sum(r[1] for r in TRACE_ROWS)),
}


SCHEDULES = ("hf-transformers-static", "hf-transformers-cb")


def _peer_rows(results: list[dict], schedule: str) -> dict[str, dict]:
    return {r["workload"]: r for r in results if r["schedule"] == schedule}


@pytest.mark.heavy
def test_throughput_results_ours_then_peers(throughput):
    assert [(r["workload"], r["schedule"]) for r in throughput] == [
        (w, s) for w in EXPECTED for s in ("sequential", *SCHEDULES)]
    for r in throughput:
        n_in, n_out = EXPECTED[r["workload"]]
        assert r["model"] == "tiny-llama"
        assert r["num_requests"] == len(TRACE_ROWS)
        assert r.get("peer_error") is None, r
        # Exact lengths, counted the same way: real prompt tokens + generated tokens.
        assert (r["prompt_tokens"], r["output_tokens"]) == (n_in, n_out), r
        assert r["elapsed_s"] > 0 and r["steps"] > 0
        assert r["total_tokens_per_s"] == pytest.approx((n_in + n_out) / r["elapsed_s"])
        assert r["output_tokens_per_s"] == pytest.approx(n_out / r["elapsed_s"])
        assert r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
        assert r["peak_tflops"] > 0 and r["optimal_tokens_per_s"] > 0
        assert r["percent_of_optimal"] == pytest.approx(
            100 * r["total_tokens_per_s"] / r["optimal_tokens_per_s"])
    # One GEMM peak for ours and the peers.
    assert len({r["peak_tflops"] for r in throughput}) == 1


@pytest.mark.heavy
def test_hf_static_peer(throughput):
    rows = _peer_rows(throughput, "hf-transformers-static")
    const, trace = rows["const:16:8"], rows["trace:splitwise"]
    for r in (const, trace):
        assert r["peer"] == "hf-static"
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["weights"] == "random init" and r["attn_implementation"] == "sdpa"
        assert r["batch_size"] == 4 and r["batches"] == 2  # 6 requests: 4 + 2
        assert len(r["batch_s"]) == 2 and sum(r["batch_s"]) <= r["elapsed_s"]
        assert r["torch"].startswith("2.") and r["transformers"].startswith("5.")
        assert r["host_ms_per_step"] is None
    # Each batch decodes to its longest output; nothing is padded when every length is equal.
    assert const["steps"] == 2 * 8 and const["padded_tokens"] == 0
    first, second = TRACE_ROWS[:4], TRACE_ROWS[4:]
    assert trace["steps"] == max(o for _, o in first) + max(o for _, o in second)
    padded = sum(max(i for i, _ in b) - i + max(o for _, o in b) - o
                 for b in (first, second) for i, o in b)
    assert trace["padded_tokens"] == padded > 0


@pytest.mark.heavy
def test_hf_continuous_batching_peer(throughput):
    rows = _peer_rows(throughput, "hf-transformers-cb")
    static = _peer_rows(throughput, "hf-transformers-static")
    for workload, r in rows.items():
        assert r["peer"] == "hf-cb" and r["cb_attn"] == "auto"
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        # No flash attention on the CPU: SDPA over the paged cache ("paged|sdpa" in 5.17).
        assert r["attn_implementation"] in ("sdpa", "paged|sdpa")
        assert r["transformers"] == static[workload]["transformers"]
        assert (r["max_batch_tokens"], r["page_size"]) == (CB_TOKENS, CB_PAGE)
        # On the CPU the cache holds the whole workload: one page per started 16 tokens.
        lens = ([(16, 8)] * len(TRACE_ROWS) if workload.startswith("const")
                else TRACE_ROWS)
        assert r["num_blocks"] == sum(math.ceil((i + o) / CB_PAGE) for i, o in lens)
        assert r["kv_cache_tokens"] == r["num_blocks"] * CB_PAGE
        assert 1 <= r["max_requests_per_batch"] <= CB_TOKENS
        assert r["use_cuda_graph"] == [False, False] and r["use_async_batching"] is False
        assert r["setup_s"] > 0 and r["host_ms_per_step"] is None
        assert "batches" not in r and "padded_tokens" not in r
        # Every pass adds at most one token per request and reads at most CB_TOKENS tokens: a
        # lower bound on the passes. Requests join and leave between passes, so mixed lengths
        # take fewer passes than static batches, which decode each batch to its longest output.
        n_in, n_out = EXPECTED[workload]
        longest = max(o for _, o in lens)
        assert r["steps"] >= max(longest, math.ceil((n_in + n_out - len(lens)) / CB_TOKENS))
    assert rows["trace:splitwise"]["steps"] < static["trace:splitwise"]["steps"]


@pytest.fixture(scope="module")
def tiny_hf():
    from nanoflow_jax.benchmarks import hf_baseline

    return hf_baseline.load_hf_model("tiny-llama", seed=0)


@pytest.mark.heavy
def test_continuous_batching_exact_lengths_with_a_full_cache(tiny_hf):
    """Four pages of 16 tokens for 8 requests of up to 60 tokens: requests wait for pages,
    prefills are split (16 tokens a pass), at most 3 requests a pass; every request still gets
    exactly its length."""
    from nanoflow_jax.benchmarks import hf_baseline

    model, info = tiny_hf
    lens = [(5, 3), (20, 9), (7, 1), (33, 12), (12, 6), (3, 10), (40, 5), (9, 20)]
    prompts = [[(7 * k + j) % 200 + 1 for j in range(n_in)] for k, (n_in, _) in enumerate(lens)]
    outs = [o for _, o in lens]
    settings = hf_baseline.PeerSettings(max_batch_tokens=16, num_blocks=4, page_size=16,
                                        max_requests=3)
    run = hf_baseline.run_continuous_batching(model, prompts, outs, "cpu", settings)
    assert run["output_tokens"] == sum(outs)  # each request's length is checked inside
    assert (run["num_blocks"], run["kv_cache_tokens"], run["max_batch_tokens"]) == (4, 64, 16)
    assert run["max_requests_per_batch"] == 3
    n_in = sum(i for i, _ in lens)
    assert run["steps"] >= math.ceil((n_in + sum(outs) - len(lens)) / 16)
    # The model is handed back with its own attention, and static batches still run.
    assert model.config._attn_implementation == "sdpa"
    static = hf_baseline.run_static_batches(model, prompts[:2], outs[:2], 2, "cpu",
                                            warmup=False)
    assert static["steps"] == max(outs[:2])


@pytest.mark.heavy
def test_peer_past_its_time_limit_gives_an_error_row(tiny_hf):
    """One request of 1000 tokens: far past a 0.3 s limit; the manager stops at once."""
    from nanoflow_jax.benchmarks import hf_baseline, workloads

    model, info = tiny_hf
    reqs = [workloads.Request(4, 1000)]
    settings = hf_baseline.PeerSettings(timeout_s=0.3, num_blocks=64, page_size=16)
    t0 = time.perf_counter()
    row = hf_baseline.run_peer("hf-cb", model, info, "const:4:1000", reqs, [[1, 2, 3, 4]],
                               settings)
    assert row["peer_error"] == "TimeoutError: stopped after 0.3 s with 0 of 1 requests done"
    assert row["total_tokens_per_s"] is None and time.perf_counter() - t0 < 60
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.heavy
def test_failing_peer_gives_an_error_row(tiny_hf):
    from nanoflow_jax.benchmarks import hf_baseline, workloads

    _, info = tiny_hf
    reqs = [workloads.Request(4, 2), workloads.Request(3, 5)]
    prompts = [[1, 2, 3, 4], [5, 6, 7]]

    class NoContinuousBatching:  # a transformers model without the API
        config = type("Config", (), {"_attn_implementation": "sdpa"})()

    row = hf_baseline.run_peer("hf-cb", NoContinuousBatching(), info, "const:4:2", reqs, prompts)
    assert row["peer_error"].startswith("PeerUnavailable:")
    assert row["schedule"] == "hf-transformers-cb" and row["num_requests"] == 2
    assert (row["prompt_tokens"], row["output_tokens"]) == (7, 7)
    assert row["total_tokens_per_s"] is None and row["percent_of_optimal"] is None
    hf_baseline.add_optimal(row, 1e12, 1000)
    assert row["percent_of_optimal"] is None and row["optimal_tokens_per_s"] == 5e8
    # A model that cannot load: one error row per peer and workload, nothing raised.
    rows = hf_baseline.run_peers("no-such-model", ("hf-static", "hf-cb"),
                                 [("const:4:2", reqs, prompts)])
    assert [r["schedule"] for r in rows] == list(SCHEDULES)
    assert all(r["peer_error"].startswith("loading the model") for r in rows)


def test_peer_names_and_settings():
    from nanoflow_jax.benchmarks import hf_baseline

    assert hf_baseline.parse_peers(["none"]) == ((), False)
    assert hf_baseline.parse_peers(["hf"]) == (("hf-static",), False)
    assert hf_baseline.parse_peers(["hf-cb", "hf", "hf-static"]) == (("hf-cb", "hf-static"), False)
    assert hf_baseline.parse_peers(["hf-only"]) == (("hf-static",), True)
    with pytest.raises(ValueError, match="--baseline: unknown peer 'vllm'"):
        hf_baseline.parse_peers(["hf", "vllm"])
    with pytest.raises(ValueError, match="baseline_num_blocks"):
        hf_baseline.PeerSettings(num_blocks=0)
    with pytest.raises(ValueError, match="baseline_page_size"):
        hf_baseline.PeerSettings(page_size=2)
    with pytest.raises(ValueError, match="baseline_cb_attn"):
        hf_baseline.PeerSettings(cb_attn="flash")
    with pytest.raises(ValueError, match="baseline_cb_max_requests"):
        hf_baseline.PeerSettings(max_requests=0)
    with pytest.raises(ValueError, match="baseline_timeout_s"):
        hf_baseline.PeerSettings(timeout_s=0)


def test_throughput_rejects_unknown_peer():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_throughput.py"),
                           "--baseline=hf,vllm"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "unknown peer 'vllm'" in proc.stderr


# ---- serving: the real server, two rates ------------------------------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory) -> tuple[dict, pathlib.Path]:
    tmp = tmp_path_factory.mktemp("serving")
    out, png = tmp / "serving.json", tmp / "serving.png"
    _run("benchmark_serving.py", "--start_server", "--model=tiny-llama", "--rates=4,inf",
         "--num_requests=8", "--workload=const:16:8", "--num_warmup=1",
         "--max_num_batched_tokens=64", "--max_model_len=256", f"--server_log={tmp / 'log'}",
         f"--output_json={out}", f"--output_png={png}", "--save_requests")
    return json.loads(out.read_text()), png


def test_serving_two_rates(serving):
    result, _ = serving
    assert result["benchmark"] == "serving" and result["workload"] == "const:16:8"
    assert result["served_model_name"] == "tiny-llama" and result["max_model_len"] == 256
    assert result["slo_ms_per_token"] == 200.0
    assert "--max_num_batched_tokens=64" in result["server"]["args"]
    assert result["server"]["startup_s"] > 0
    assert [r["rate"] for r in result["rates"]] == [4.0, "inf"]
    for r in result["rates"]:
        assert (r["num_requests"], r["completed"], r["failed"], r["errors"]) == (8, 8, 0, {})
        assert r["prompt_tokens"] == 8 * 16
        assert r["output_tokens"] == r["expected_output_tokens"] == 8 * 8
        assert r["output_tokens_exact"]
        assert r["requests_per_s"] > 0 and r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
        assert r["output_tokens_per_s"] == pytest.approx(64 / r["duration_s"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "normalized_latency_ms_per_token"):
            s = r[key]
            assert 0 <= s["p50"] <= s["p90"] <= s["p99"], (key, s)
            assert s["mean"] >= 0 and s["count"] > 0
        assert r["ttft_ms"]["mean"] <= r["e2e_ms"]["mean"]
        assert r["normalized_latency_ms_per_token"]["mean"] == pytest.approx(
            sum(q["e2e_s"] / q["output_tokens"] for q in r["requests"]) / 8 * 1e3)
        assert r["tokens_per_chunk"] >= 1
        # Per request: exact lengths, TPOT from TTFT and e2e, the inter-chunk gaps.
        for q in r["requests"]:
            assert q["ok"] and q["output_tokens"] == 8 and 1 <= q["chunks"] <= 8
            assert q["tpot_s"] == pytest.approx((q["e2e_s"] - q["ttft_s"]) / 7)
            assert len(q["itl_s"]) == q["chunks"] - 1
            assert sum(q["itl_s"]) == pytest.approx(q["e2e_s"] - q["ttft_s"])
    # Poisson at 4 req/s: sends spread out; inf: all sent at once.
    starts = {r["rate"]: sorted(q["start_s"] for q in r["requests"]) for r in result["rates"]}
    assert starts[4.0][-1] > 0.1 and starts["inf"][-1] < 0.5


def test_serving_slo_and_plot(serving):
    result, png = serving
    # A tiny model on a CPU is far under 200 ms per output token at both rates.
    assert all(r["meets_slo"] for r in result["rates"])
    assert result["max_rate_under_slo"] == "inf"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


# ---- serving: failures are counted, never hang ---------------------------------------------------


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """/v1/models; /v1/completions answers, in arrival order: 503, a stall, a good stream."""

    counter = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "stub", "max_model_len": 64}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            kind = _StubHandler.counter % 3
            _StubHandler.counter += 1
        if kind == 0:
            self._json(503, {"error": {"message": "overloaded", "code": "queue_full"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if kind == 1:
            self.wfile.write(b'data: {"choices":[{"index":0,"text":"a"}]}\n\n')
            self.wfile.flush()
            time.sleep(30)  # stalls mid-stream: the client's timeout must end it
            return
        n = body["max_tokens"]
        for _ in range(n):
            self.wfile.write(b'data: {"choices":[{"index":0,"text":"x"}]}\n\n')
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        self.wfile.write(f'data: {json.dumps({"choices": [], "usage": usage})}\n\n'.encode())
        self.wfile.write(b"data: [DONE]\n\n")


def test_serving_failures_are_counted_and_time_out(tmp_path):
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    stub.daemon_threads = True
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    out = tmp_path / "stub.json"
    try:
        t0 = time.monotonic()
        _run("benchmark_serving.py", f"--url=http://127.0.0.1:{stub.server_address[1]}",
             "--rates=inf", "--num_requests=6", "--num_warmup=0", "--workload=const:4:3",
             "--vocab_size=100", "--request_timeout_s=2", f"--output_json={out}")
        elapsed = time.monotonic() - t0
    finally:
        stub.shutdown()
        stub.server_close()
    result = json.loads(out.read_text())
    (r,) = result["rates"]
    assert (r["completed"], r["failed"]) == (2, 4)
    assert r["errors"] == {"http_503": 2, "timeout": 2}
    assert any("overloaded" in e for e in r["error_examples"])
    assert r["output_tokens"] == 6 and r["output_tokens_exact"]
    assert r["duration_s"] < 10 and elapsed < 60  # the stalled streams were cut at 2 s
    assert not r["meets_slo"] and result["max_rate_under_slo"] is None
    assert math.isfinite(r["normalized_latency_ms_per_token"]["mean"])


def test_serving_rejects_bad_rates():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"),
                           "--rates=2,0"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode != 0 and "must be > 0" in proc.stderr


def test_device_ms_per_call_enqueues_calls_back_to_back():
    """One warm-up call, then `repeats` timings of `calls` calls each, all blocked on."""
    import jax.numpy as jnp

    from nanoflow_jax.benchmarks.timing import device_ms_per_call

    seen = []

    def fn(x):
        seen.append(1)
        return x + 1

    ms = device_ms_per_call(fn, jnp.ones(4), calls=3, repeats=2)
    assert len(seen) == 1 + 3 * 2
    assert ms > 0 and math.isfinite(ms)
    with pytest.raises(ValueError, match="calls and repeats"):
        device_ms_per_call(fn, jnp.ones(4), calls=0)

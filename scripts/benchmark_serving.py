"""Online serving: Poisson arrivals at several request rates against the OpenAI-compatible server.

    python scripts/benchmark_serving.py --start_server --rates=1,2,4,inf \
        --num_requests=32 --output_json=serving.json --output_png=serving.png   # tiny, CPU
    python scripts/benchmark_serving.py --start_server --model=llama-3-8b \
        --workload=trace:splitwise --rates=2,4,8,16,32 --num_requests=256 \
        --output_json=serving.json --output_png=serving.png                    # a GPU
    python scripts/benchmark_serving.py --url=http://10.0.0.5:8000 --model=llama-3-8b ...

Every rate sends the same `--num_requests` requests (the workload's, in order) with exponential
gaps of mean 1/rate (`inf`: all at once) to POST /v1/completions: random token-id prompts,
`max_tokens` = the workload's output length, `ignore_eos`, greedy, streamed. Per request it
measures TTFT (to the first streamed chunk), end-to-end latency (to the last), TPOT
((e2e - TTFT) / (output tokens - 1)), the gaps between chunks (inter-token latency) and the
normalized latency (e2e / output tokens, NanoFlow's and vLLM's serving metric), and per rate
their mean / p50 / p90 / p99, the throughput, and the failed requests (non-200, errors in the
stream, timeouts, unfinished streams: none of them stops the run). The answer is the highest
rate whose mean normalized latency stays under `--slo_ms_per_token` with no request failed.

Output token counts come from the stream's usage chunk. The server streams text: a token whose
text is empty or an incomplete character is sent with a later one, so chunks can be fewer than
tokens (`tokens_per_chunk` in the results): TTFT and inter-token latencies are then those of text
chunks, while e2e, TPOT and normalized latency stay exact.

`--start_server` launches `scripts/serve.py` on a free port with `--model` and the engine knobs
given here (the others keep serve.py's defaults), waits for /health and stops it at the end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from nanoflow_jax import cli
from nanoflow_jax.benchmarks import workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("url", "http://127.0.0.1:8000", "a running server (unless --start_server)")
flags.DEFINE_bool("start_server", False, "start scripts/serve.py with --model and the engine "
                  "knobs below on a free port, and stop it at the end")
flags.DEFINE_string("served_model_name", None, "the API's model name (default: the server's "
                    "first in /v1/models)")
flags.DEFINE_string("api_key", None, "sent as 'Authorization: Bearer <key>'")
flags.DEFINE_string("workload", "const:64:32", "const:IN:OUT or trace:splitwise|lmsys|sharegpt")
flags.DEFINE_string("trace_dir", workloads.DEFAULT_TRACE_DIR, "directory of the trace CSVs")
flags.DEFINE_list("rates", ["1", "2", "4", "8"],
                  "request rates (req/s) to sweep; inf = all at once")
flags.DEFINE_integer("num_requests", 64, "requests per rate", lower_bound=1)
flags.DEFINE_integer("num_warmup", 2, "requests sent (and not measured) before the first rate",
                     lower_bound=0)
flags.DEFINE_integer("vocab_size", None, "prompt token ids below this (default: --model's)")
flags.DEFINE_float("slo_ms_per_token", 200.0, "SLO on the mean normalized latency (e2e / output "
                   "tokens), as in the NanoFlow paper", lower_bound=0.0)
flags.DEFINE_float("request_timeout_s", 600.0, "a request still unfinished after this is "
                   "abandoned and counted as failed")
flags.DEFINE_float("idle_timeout_s", 60.0, "between rates, wait up to this for the server to "
                   "run and queue nothing (read from /metrics when it has them)", lower_bound=0.0)
flags.DEFINE_string("output_json", None, "write the results here")
flags.DEFINE_string("output_png", None, "plot normalized latency and p99 TTFT against the rate")
flags.DEFINE_bool("save_requests", False, "add every request's measurements to the JSON")
# --start_server: the engine flags (EngineConfig's) given here are passed on to serve.py; the
# others keep serve.py's defaults.
cli.define_engine_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_integer("max_queue", None, "server: most waiting requests (default: enough for "
                     "--num_requests at once)")
flags.DEFINE_multi_string("server_arg", [], "server: any other serve.py flag, e.g. "
                          "--server_arg=--schedule=nano2 (repeat)")
flags.DEFINE_float("server_timeout_s", 1200.0, "server: how long start-up may take")
flags.DEFINE_string("server_log", None, "server: its log file (default: a temporary file)")
F = flags.FLAGS

PERCENTILES = (50, 90, 99)


# ---- the server process ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/serve.py in a subprocess (same Python, the checkout on PYTHONPATH)."""

    def __init__(self, env: dict[str, str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if F.server_log:
            self.log_path = F.server_log
        else:
            fd, self.log_path = tempfile.mkstemp(prefix="benchmark_serving_", suffix=".log")
            os.close(fd)
        max_queue = F.max_queue or max(256, F.num_requests + F.num_warmup)
        engine_flags = {"model": F.model, "seed": F.seed, **cli.engine_flags_set()}
        self.args = [f"--{name}={value}" for name, value in engine_flags.items()]
        self.args += ["--host=127.0.0.1", f"--port={self.port}", f"--max_queue={max_queue}",
                      "--noaccess_log"]
        self.args += F.server_arg
        env = dict(env, PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, env.get("PYTHONPATH", "")) if p))
        self._log = open(self.log_path, "w")  # noqa: SIM115 (open while the server runs)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"),
                                      *self.args], cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.startup_s = None

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + F.server_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5, trust_env=False).status_code == 200:
                    self.startup_s = time.perf_counter() - self.t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not healthy after {F.server_timeout_s:g}s; its log "
                           f"({self.log_path}) ends:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second one skips the drain
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- requests ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    index: int
    prompt_len: int
    expected_output_len: int
    ok: bool = False
    error: str | None = None       # failure kind: http_503, timeout, stream_error, ...
    detail: str | None = None      # the body / exception text (cut short)
    start_s: float = 0.0           # when it was sent, after the rate's first send
    output_tokens: int = 0
    chunks: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def normalized_s(self) -> float | None:
        return self.e2e_s / self.output_tokens if self.ok and self.output_tokens else None


async def _stream_one(client, url: str, body: dict, headers: dict, res: Result) -> None:
    t_send = time.perf_counter()
    times = []
    usage = None
    done = False
    async with client.stream("POST", f"{url}/v1/completions", json=body,
                             headers=headers) as resp:
        if resp.status_code != 200:
            res.error = f"http_{resp.status_code}"
            res.detail = (await resp.aread()).decode(errors="replace")[:300]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            if data.startswith('{"error"'):
                res.error, res.detail = "stream_error", data[:300]
                return
            if '"usage"' in data:  # (text is escaped JSON: it never holds a bare "usage")
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if not chunk.get("choices"):
                    continue
            times.append(now)
    if not done or not times:
        res.error, res.detail = "incomplete", f"{len(times)} chunks and no [DONE]"
        return
    res.chunks = len(times)
    res.output_tokens = usage["completion_tokens"] if usage else len(times)
    res.ttft_s = times[0] - t_send
    res.e2e_s = times[-1] - t_send
    res.itl_s = [b - a for a, b in itertools.pairwise(times)]
    res.ok = True


async def send_request(client, url: str, body: dict, headers: dict, res: Result,
                       timeout_s: float) -> Result:
    """Never raises and never outlives `timeout_s`: a failure is recorded in `res`."""
    import httpx

    try:
        await asyncio.wait_for(_stream_one(client, url, body, headers, res), timeout_s)
    except (TimeoutError, httpx.TimeoutException) as e:
        res.error, res.detail = "timeout", f"{type(e).__name__} after {timeout_s:g}s"
    except httpx.HTTPError as e:
        res.error, res.detail = f"{type(e).__name__}", str(e)[:300]
    except Exception as e:  # noqa: BLE001 (a malformed stream must not stop the benchmark)
        res.error, res.detail = f"{type(e).__name__}", str(e)[:300]
    if res.error:
        res.ok = False
    return res


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps of mean 1/rate, the first request at 0."""
    import numpy as np

    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, max(n - 1, 0))
    return [0.0] + np.cumsum(gaps).tolist()


def _body(model: str, ids: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def run_rate(client, url: str, model: str, headers: dict, reqs, prompts, rate: float,
                   seed: int, timeout_s: float) -> tuple[list[Result], float]:
    """All requests at `rate`; (results, seconds from the first send to the last answer)."""
    arrivals = arrival_times(len(reqs), rate, seed)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    p0 = time.perf_counter()

    async def one(i: int) -> Result:
        delay = t0 + arrivals[i] - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        res = Result(i, reqs[i].prompt_len, reqs[i].output_len,
                     start_s=time.perf_counter() - p0)
        return await send_request(client, url, _body(model, prompts[i], reqs[i].output_len),
                                  headers, res, timeout_s)

    results = await asyncio.gather(*(one(i) for i in range(len(reqs))))
    return list(results), time.perf_counter() - p0


async def wait_idle(client, url: str, timeout_s: float) -> None:
    """Until /metrics says nothing runs or waits (skipped where the server has no such metrics)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            resp = await client.get(f"{url}/metrics", timeout=10)
        except Exception:  # noqa: BLE001
            return
        if resp.status_code != 200:
            return
        values = {}
        for line in resp.text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in ("nanoflow_num_requests_running", "nanoflow_num_requests_waiting"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if not values or not any(values.values()):
            return
        await asyncio.sleep(0.2)


# ---- statistics --------------------------------------------------------------------------------


def stats_ms(values_s) -> dict[str, float | None]:
    import numpy as np

    v = np.asarray([x for x in values_s if x is not None], np.float64) * 1e3
    if not v.size:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "count": 0}
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES},
            "count": int(v.size)}


def rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def summarize(rate: float, results: list[Result], duration: float, slo_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    n_out = sum(r.output_tokens for r in ok)
    n_in = sum(r.prompt_len for r in ok)
    chunks = sum(r.chunks for r in ok)
    row = {
        "rate": rate_label(rate), "num_requests": len(results), "completed": len(ok),
        "failed": len(failed), "errors": errors,
        "error_examples": [f"{r.error}: {r.detail}" for r in failed[:3]],
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": n_out / duration if duration > 0 else 0.0,
        "total_tokens_per_s": (n_in + n_out) / duration if duration > 0 else 0.0,
        "prompt_tokens": n_in, "output_tokens": n_out,
        "expected_output_tokens": sum(r.expected_output_len for r in ok),
        "output_tokens_exact": all(r.output_tokens == r.expected_output_len for r in ok),
        "tokens_per_chunk": n_out / chunks if chunks else None,
        "ttft_ms": stats_ms(r.ttft_s for r in ok),
        "tpot_ms": stats_ms(r.tpot_s for r in ok),
        "itl_ms": stats_ms(x for r in ok for x in r.itl_s),
        "e2e_ms": stats_ms(r.e2e_s for r in ok),
        "normalized_latency_ms_per_token": stats_ms(r.normalized_s for r in ok),
    }
    mean_norm = row["normalized_latency_ms_per_token"]["mean"]
    row["meets_slo"] = bool(ok and not failed and mean_norm is not None and mean_norm <= slo_ms)
    return row


def max_rate_under_slo(rows: list[dict]) -> float | str | None:
    """The highest rate that meets the SLO ("inf" sorts last); None if none does."""
    passing = [r["rate"] for r in rows if r["meets_slo"]]
    if not passing:
        return None
    return max(passing, key=lambda x: math.inf if x == "inf" else x)


def plot(rows: list[dict], slo_ms: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["rate"] for r in rows if r["rate"] != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if r["rate"] == "inf" else r["rate"] for r in rows]
    labels = ["inf" if r["rate"] == "inf" else f"{r['rate']:g}" for r in rows]
    norm = [r["normalized_latency_ms_per_token"]["mean"] for r in rows]
    norm_p99 = [r["normalized_latency_ms_per_token"]["p99"] for r in rows]
    ttft_p99 = [r["ttft_ms"]["p99"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(xs, norm, "o-", label="mean")
    ax1.plot(xs, norm_p99, "s--", alpha=0.6, label="p99")
    ax1.axhline(slo_ms, color="red", ls=":", label=f"SLO {slo_ms:g} ms/token")
    ax1.set_ylabel("normalized latency (ms / output token)")
    ax2.plot(xs, ttft_p99, "o-", color="tab:orange", label="p99 TTFT")
    ax2.set_ylabel("p99 time to first token (ms)")
    for ax in (ax1, ax2):
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------


def parse_rates(values: list[str]) -> list[float]:
    rates = []
    for v in values:
        try:
            rate = float(v)
        except ValueError:
            raise app.UsageError(f"--rates: {v!r} is not a number or inf") from None
        if not rate > 0:
            raise app.UsageError(f"--rates: {v!r} must be > 0")
        rates.append(rate)
    if not rates:
        raise app.UsageError("--rates is empty")
    return rates


async def benchmark(url: str, server: Server | None) -> dict:
    import httpx

    rates = parse_rates(F.rates)
    headers = {"Authorization": f"Bearer {F.api_key}"} if F.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(F.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        resp = await client.get(f"{url}/v1/models", headers=headers)
        resp.raise_for_status()
        served = resp.json()["data"][0]
        model_name = F.served_model_name or served["id"]
        config = None
        if F.vocab_size is None or served.get("max_model_len") is None:
            from nanoflow_jax.model_loader import load_config

            config = load_config(F.model)
        vocab = F.vocab_size or config.vocab_size
        max_model_len = served.get("max_model_len") or F.max_model_len \
            or config.max_position_embeddings
        reqs = workloads.load_workload(F.workload, F.num_requests, max_model_len, F.seed,
                                       F.trace_dir)
        prompts = workloads.prompt_token_ids(reqs, vocab, F.seed)

        if F.num_warmup:
            warm = [Result(-1 - i, reqs[i % len(reqs)].prompt_len, 0)
                    for i in range(F.num_warmup)]
            warm = await asyncio.gather(*(
                send_request(client, url, _body(model_name, prompts[i % len(reqs)],
                                                min(16, reqs[i % len(reqs)].output_len)),
                             headers, w, F.request_timeout_s) for i, w in enumerate(warm)))
            if not any(w.ok for w in warm):
                raise RuntimeError(f"every warm-up request failed: {warm[0].error}: "
                                   f"{warm[0].detail}")
            await wait_idle(client, url, F.idle_timeout_s)

        rows = []
        for rate in rates:
            print(f"rate {rate_label(rate)} req/s: {len(reqs)} requests ...", flush=True)
            results, duration = await run_rate(client, url, model_name, headers, reqs, prompts,
                                               rate, F.seed, F.request_timeout_s)
            row = summarize(rate, results, duration, F.slo_ms_per_token)
            if F.save_requests:
                row["requests"] = [{**dataclasses.asdict(r), "tpot_s": r.tpot_s,
                                    "normalized_s": r.normalized_s} for r in results]
            rows.append(row)
            _print_row(row)
            await wait_idle(client, url, F.idle_timeout_s)

    out = {
        "benchmark": "serving", "url": url, "model": F.model, "served_model_name": model_name,
        "workload": F.workload, "num_requests": len(reqs), "seed": F.seed,
        "max_model_len": max_model_len, "vocab_size": vocab,
        "slo_ms_per_token": F.slo_ms_per_token, "request_timeout_s": F.request_timeout_s,
        "max_rate_under_slo": max_rate_under_slo(rows),
        "rates": rows,
    }
    if server is not None:
        out["server"] = {"args": server.args, "startup_s": server.startup_s,
                         "log": server.log_path}
    chunky = [r["tokens_per_chunk"] for r in rows if (r["tokens_per_chunk"] or 1) > 1.5]
    if chunky:
        out["warning"] = (f"the server streamed up to {max(chunky):.1f} tokens per chunk: TTFT "
                          "and inter-token latencies are those of text chunks (tokens with no "
                          "text of their own are sent with a later one); e2e, TPOT and "
                          "normalized latency are exact")
    return out


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def _print_row(r: dict) -> None:
    print(f"  completed {r['completed']}/{r['num_requests']} (failed {r['failed']}"
          f"{' ' + str(r['errors']) if r['errors'] else ''}) in {r['duration_s']:.2f}s: "
          f"{r['requests_per_s']:.2f} req/s, {r['output_tokens_per_s']:.1f} output tok/s, "
          f"{r['total_tokens_per_s']:.1f} total tok/s", flush=True)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "normalized_latency_ms_per_token"):
        s = r[key]
        print(f"  {key:<32} mean {_fmt(s['mean']):>9}  p50 {_fmt(s['p50']):>9}  "
              f"p90 {_fmt(s['p90']):>9}  p99 {_fmt(s['p99']):>9}", flush=True)


def main(argv):
    del argv
    parse_rates(F.rates)  # usage errors before a server starts
    if not F.request_timeout_s > 0:
        raise app.UsageError("--request_timeout_s must be > 0")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    server_env = dict(os.environ)
    # This process only sends HTTP: keep JAX (imported with the workload helpers) off the GPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    server = None
    # SIGTERM (a job's time limit) exits through `finally`, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if F.start_server:
            server = Server(server_env)
            print(f"starting the server: serve.py {' '.join(server.args)} (log: "
                  f"{server.log_path})", flush=True)
            server.wait_ready()
            print(f"server ready in {server.startup_s:.1f}s", flush=True)
            url = server.url
        else:
            url = F.url.rstrip("/")
        out = asyncio.run(benchmark(url, server))
    finally:
        if server is not None:
            server.stop()

    if F.output_json:
        with open(F.output_json, "w") as f:
            json.dump(out, f, indent=2)
    print("\nrate | completed | failed | req/s | output tok/s | mean TTFT ms | p99 TTFT ms | "
          "mean TPOT ms | mean normalized ms/token | SLO")
    for r in out["rates"]:
        print(" | ".join([str(r["rate"]), str(r["completed"]), str(r["failed"]),
                          f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}",
                          _fmt(r["ttft_ms"]["mean"]), _fmt(r["ttft_ms"]["p99"]),
                          _fmt(r["tpot_ms"]["mean"]),
                          _fmt(r["normalized_latency_ms_per_token"]["mean"]),
                          "yes" if r["meets_slo"] else "no"]))
    print(f"highest rate under the {F.slo_ms_per_token:g} ms/token SLO: "
          f"{out['max_rate_under_slo']}")
    if "warning" in out:
        print("warning:", out["warning"])
    if F.output_png:
        title = (f"{F.model} · {F.workload} · {len(out['rates'])} rates × "
                 f"{out['num_requests']} requests · max rate under SLO: "
                 f"{out['max_rate_under_slo']}")
        plot(out["rates"], F.slo_ms_per_token, F.output_png, title)
        print("plot:", F.output_png)


if __name__ == "__main__":
    cli.run(main)

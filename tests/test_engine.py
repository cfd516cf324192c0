"""The engine end to end on tiny models: HF greedy parity, chunking, preemption, many
requests, seeds, stops, n > 1, logprobs, aborts, bad input, and no recompilation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax import LLM, SamplingParams
from nanoflow_jax.batch import build_batch
from nanoflow_jax.engine.outputs import ListPrefix
from nanoflow_jax.engine.sampler import SampleMode, sampling_tensors
from tests.helpers import golden_path

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _golden_prompts(name):
    g = np.load(golden_path(name) + "/greedy.npz")
    n = len([k for k in g if k.startswith("prompt_")])
    return [g[f"prompt_{i}"].tolist() for i in range(n)], [g[f"output_{i}"].tolist()
                                                           for i in range(n)]


@pytest.mark.parametrize("name, engine_args", [
    ("llama", dict(max_num_batched_tokens=128)),
    # Every prompt is chunked; a sliding window of 16 on layer 1.
    ("qwen2", dict(max_num_batched_tokens=16, min_bucket=8)),
    # Preemption; a sliding window of 16 on every layer, which each generation crosses.
    ("mistral", dict(max_num_batched_tokens=32, page_size=4, num_pages=32,
                     max_model_len=128)),
])
def test_greedy_equals_hf_generate(name, engine_args):
    prompts, expected = _golden_prompts(name)
    llm = LLM(golden_path(name), dtype="float32", **engine_args)
    preempting = "num_pages" in engine_args
    # Requests without max_tokens run to max_model_len: their KV use is not known at
    # admission, so they outgrow the small cache and are preempted (recomputed); greedy
    # decoding gives the same first tokens as HF's 16.
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True) if preempting \
        else GREEDY
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt, want in zip(outs, prompts, expected):
        ids = out.outputs[0].token_ids
        assert ids[:len(want)] == want
        assert len(ids) == (engine_args.get("max_model_len", 0) - len(prompt) if preempting
                            else len(want))
        assert out.outputs[0].finish_reason == "length"
    if preempting:
        assert llm.engine.stats.preemptions > 0
    assert llm.engine.allocator.num_free == llm.engine.runner.num_pages


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", dtype="float32", max_num_batched_tokens=64, max_num_seqs=32,
               max_prefill_seqs=4, page_size=4, num_pages=300, max_model_len=160, seed=0)


def test_many_requests_exact_lengths_no_leaks_no_recompiles(llm):
    compiled = llm.engine.runner.num_compiled
    # all compiled by the warm-up: each bucket's model, and the sampler in each mode for each
    # number of sampled rows the buckets have
    runner = llm.engine.runner
    rows = {runner.shape_for(t).num_logits for t in runner.buckets}
    assert compiled == len(runner.buckets) + len(rows) * len(SampleMode.all())
    rng = np.random.default_rng()
    lens = rng.integers(1, 100, 200)
    outs_len = rng.integers(1, 40, 200)
    prompts = [{"prompt_token_ids": rng.integers(0, 512, n).tolist()} for n in lens]
    params = [SamplingParams(temperature=float(rng.uniform(0, 1.5)), top_k=int(rng.integers(0, 5)),
                             max_tokens=int(m), ignore_eos=True) for m in outs_len]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == outs_len.tolist()
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert [len(o.prompt_token_ids) for o in outs] == lens.tolist()
    assert llm.engine.allocator.num_free == llm.engine.runner.num_pages
    assert llm.engine.runner.num_compiled == compiled
    assert not llm.engine.has_unfinished_requests()


def test_step_has_no_device_side_branch(llm):
    """An XLA conditional on the GPU copies its predicate to the host and blocks the thread
    that enqueues the step until the device reaches it (a sampler with
    `lax.cond`s held every enqueue for a whole step). Neither program of a step has one."""
    runner = llm.engine.runner
    shape = runner.shape_for(runner.buckets[-1])
    batch = build_batch([], [], shape, runner.config.page_size)
    sampling = sampling_tensors([], [], [], pad_to=shape.num_logits)
    forward = runner._forward.lower(runner.params, runner.kv, batch, runner._prev_tokens)
    hidden = jax.ShapeDtypeStruct((runner.num_rows, runner.model_config.hidden_size),
                                  jnp.float32)
    hlos = [forward.as_text()] + [runner._sample.lower(runner._head, hidden, sampling,
                                                       mode=m).as_text()
                                  for m in SampleMode.all()]
    assert all("stablehlo.case" not in h and "stablehlo.if" not in h for h in hlos)


def test_steps_take_logits_of_the_rows_they_use(llm, monkeypatch):
    """A step samples through the fewest rows that hold its decodes and chunks (the used rows
    come first), and its samples are those of the same step given every row of its bucket."""
    runner = llm.engine.runner
    counts = sorted({runner.shape_for(t).num_logits for t in runner.buckets})
    largest = runner.shape_for(runner.buckets[-1])
    assert runner.rows_for(1, largest) == counts[0]
    assert runner.rows_for(counts[0] + 1, largest) == counts[1]
    assert runner.rows_for(largest.num_logits, largest) == largest.num_logits
    seen = []
    run_step = runner.run_step

    def record(batch, sampling, mode):
        seen.append((batch.token_ids.shape[0], sampling.temperature.shape[0]))
        return run_step(batch, sampling, mode)

    monkeypatch.setattr(runner, "run_step", record)
    prompts = [{"prompt_token_ids": [5 + i] * 30} for i in range(2)]
    got = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert (largest.num_tokens, counts[0]) in seen  # 2 chunks of 30 in the 64-token bucket
    monkeypatch.setattr(runner, "rows_for", lambda used, shape: shape.num_logits)
    want = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_full_batch_stats_count_only_full_iterations(llm):
    eng = llm.engine
    before = dataclasses.replace(eng.stats)
    # 8 prompts of 40 tokens = 320 prompt tokens: five iterations fill the 64-token budget,
    # then decode-only iterations of 8 tokens do not.
    llm.generate([{"prompt_token_ids": [7] * 40}] * 8,
                 SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    full_steps = eng.stats.full_steps - before.full_steps
    steps = eng.stats.steps - before.steps
    assert 4 <= full_steps < steps
    assert eng.stats.full_tokens - before.full_tokens == 64 * full_steps
    assert eng.stats.full_s > before.full_s


def test_seed_gives_same_sample_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(40, 60))}
    alone = llm.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids
    rng = np.random.default_rng()
    others = [{"prompt_token_ids": rng.integers(0, 512, int(n)).tolist()}
              for n in rng.integers(1, 50, 9)]
    mixed = llm.generate(others[:4] + [prompt] + others[4:],
                         [SamplingParams(temperature=1.0, max_tokens=20)] * 4 + [p]
                         + [SamplingParams(temperature=0.7, max_tokens=5)] * 5, use_tqdm=False)
    assert mixed[4].outputs[0].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                       max_tokens=12, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_logprobs_and_stop_token(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=3, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], p, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # distinct samples
    for o in out.outputs:
        assert len(o.logprobs) == 8
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and all(v <= 0 for v in lp.values()) and len(lp) in (3, 4)
        assert o.cumulative_logprob == pytest.approx(sum(lp[t] for lp, t in
                                                         zip(o.logprobs, o.token_ids)))
    greedy = llm.generate([{"prompt_token_ids": [9, 8, 7]}], GREEDY, use_tqdm=False)[0]
    stop_at = greedy.outputs[0].token_ids[5]
    first = greedy.outputs[0].token_ids.index(stop_at)
    stopped = llm.generate([{"prompt_token_ids": [9, 8, 7]}],
                           SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_at]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == greedy.outputs[0].token_ids[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at


def test_stop_string_is_not_emitted(llm):
    greedy = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=24,
                                                          ignore_eos=True), use_tqdm=False)
    text = greedy[0].outputs[0].text
    # A stop string taken from the greedy text itself (printable ASCII makes it robust).
    candidates = [text[i:i + 2] for i in range(4, len(text) - 2)
                  if text[i:i + 2].isascii() and text[i:i + 2].isprintable()]
    assert candidates, f"fixed weights and greedy decoding gave no printable pair: {text!r}"
    stop = candidates[0]
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                       ignore_eos=True), use_tqdm=False)
    o = out[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[:text.index(stop)] and stop not in o.text


def test_streamed_outputs_equal_offline_and_stay_as_returned(llm):
    """Streaming (outputs every step: views of the engine's lists, incremental text) ends
    where the offline path (one decode at the end) does, for sampled bytes that split
    characters, ids the byte tokenizer skips (259..511 of tiny-llama's 512) and n > 1 with
    logprobs; and an output streamed at one step still reads the same after the later ones."""
    eng = llm.engine
    requests = [([1, 2, 3], SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                                           ignore_eos=True)),
                ([200, 201], SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=30,
                                            logprobs=2, ignore_eos=True)),
                ([65, 66, 67], SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                                              ignore_eos=True, skip_special_tokens=False))]

    def snapshot(out):
        return [(c.text, list(c.token_ids), c.logprobs and list(c.logprobs),
                 c.cumulative_logprob) for c in out.outputs]

    def run(stream):
        eng.stream_outputs = stream
        try:
            for i, (ids, p) in enumerate(requests):
                eng.add_request(f"stream-{i}", {"prompt_token_ids": ids}, p)
            seen, final = [], {}
            while eng.has_unfinished_requests():
                for out in eng.step():
                    seen.append((out, snapshot(out)))
                    if out.finished:
                        final[out.request_id] = out
        finally:
            eng.stream_outputs = False
        return seen, final

    seen, streamed = run(True)
    _, offline = run(False)
    assert len(seen) > 3 * len(requests)  # outputs every step, not only the last
    for out, then in seen:
        assert snapshot(out) == then  # a view does not move when the engine's list grows
        for c, last in zip(out.outputs, streamed[out.request_id].outputs):
            assert last.text.startswith(c.text) and last.token_ids[:len(c.token_ids)] == c.token_ids
    assert snapshot(streamed["stream-0"])[0][1] != snapshot(streamed["stream-2"])[0][1]
    skipped = 0
    for rid, out in streamed.items():
        assert snapshot(out) == snapshot(offline[rid])
        skip = requests[int(rid[-1])][1].skip_special_tokens
        for c in out.outputs:
            assert type(c.token_ids) is list and c.finish_reason == "length"
            assert c.text == eng.tokenizer.decode(c.token_ids, skip)
            skipped += sum(t >= eng.tokenizer.vocab_size for t in c.token_ids)
    assert skipped > 0  # ids the byte tokenizer skips were sampled


def test_list_prefix_is_a_fixed_view():
    items = [5, 6, 7]
    view = ListPrefix(items, 2)
    items += [8, 9]
    assert len(view) == 2 and list(view) == [5, 6] and view == [5, 6] and view == (5, 6)
    assert view != [5, 6, 7] and view[-1] == 6 and view[1:] == [6] and view[::-1] == [6, 5]
    assert view.index(6) == 1 and 7 not in view and repr(view) == "[5, 6]"
    assert [view] == [[5, 6]] and view == ListPrefix(items, 2) and view != ListPrefix(items, 3)
    with pytest.raises(IndexError):
        view[2]


def test_abort_frees_pages(llm):
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": list(range(90))},
                    SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", {"prompt_token_ids": list(range(30))},
                    SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.allocator.num_free < eng.runner.num_pages
    eng.abort_request("a")
    eng.abort_request("b")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.allocator.num_free == eng.runner.num_pages


@pytest.mark.parametrize("prompt, params, match", [
    ({"prompt_token_ids": [1, 2]}, dict(max_tokens=0), "max_tokens"),
    ({"prompt_token_ids": [1, 2]}, dict(max_tokens=-3), "max_tokens"),
    ({"prompt_token_ids": [1, 2]}, dict(temperature=-0.5), "temperature"),
    ({"prompt_token_ids": [1, 2]}, dict(top_p=0.0), "top_p"),
    ({"prompt_token_ids": [1, 2]}, dict(top_p=1.5), "top_p"),
    ({"prompt_token_ids": list(range(160))}, {}, "max_model_len"),
    ("", {}, "empty"),
    ({"prompt_token_ids": []}, {}, "non-empty"),
    ({"prompt_token_ids": [1, 512]}, {}, "outside the vocabulary"),
    ({"prompt_token_ids": [-1]}, {}, "outside the vocabulary"),
])
def test_bad_input_is_a_value_error_and_the_engine_keeps_serving(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], SamplingParams(**params), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 16
    assert not llm.engine.has_unfinished_requests()


def test_kv_cache_that_cannot_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="max_model_len"):
        nf.LLMEngine(nf.EngineConfig(model="tiny-llama", num_pages=3, page_size=4,
                                     max_model_len=64))

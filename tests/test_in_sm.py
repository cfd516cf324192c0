"""The in-SM schedule: the same outputs and KV cache as the sequential schedule, the kernel's
op given the right rows, its alias and its start-up errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax.kv_cache import init_kv_cache
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline import in_sm
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.schedule import Schedule, sequential
from nanoflow_jax.pipeline.spec import ScheduleSpec, named_schedule
from tests.helpers import rel_err
from tests.test_pipeline import (PAGE, T, _batch, _forward, _prefill_context,
                                 assert_same_step)


def _insm(rows: int) -> Schedule:
    return dataclasses.replace(sequential(T), name=f"insm{rows}", in_sm_rows=rows)


def _run(kind, rows, beside=None, model="tiny-llama"):
    model = nf.load_model(model, dtype="float32", seed=7)
    rng = np.random.default_rng()
    batch = jax.device_put(_batch(kind, rng, model.config.vocab_size))
    kv = _prefill_context(model, init_kv_cache(model.config, 200, PAGE, jnp.float32), rng)
    attention = attention_fn("reference")
    want = _forward(model.params, model.config, kv, batch, attention, llama.run_layers)
    got = _forward(model.params, model.config, kv, batch, attention,
                   make_layers_fn(_insm(rows), beside=beside))
    return batch, want, got


# Rows 0..15 are decode rows (5 used in "mixed", 12 in "decode"), prompt chunks follow: a split
# inside the decode rows (B attends its own), at their end, and inside the prompt rows.
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("rows", [8, 16, 48])
def test_in_sm_layers_match_sequential(kind, rows):
    assert_same_step(*_run(kind, rows))


def test_the_kernel_op_gets_b_rows_and_a_decode_rows():
    calls = []

    def beside(a, b, q, k_pages, v_pages, tables, lengths):
        calls.append((a.shape, b.shape, q.shape, tables.shape, lengths.shape))
        return in_sm.separate_beside(a, b, q, k_pages, v_pages, tables, lengths,
                                     impl="reference")

    batch, (want, _), (got, _) = _run("mixed", 24, beside)
    cfg = nf.load_model("tiny-llama", dtype="float32").config
    # Once per layer: the up/gate GEMM of rows 24..63 beside the attention of the 16 decode rows.
    assert calls == [((T - 24, cfg.hidden_size), (cfg.hidden_size, 2 * cfg.intermediate_size),
                      (16, cfg.num_heads, cfg.head_dim), (16, 16), (16,))] * cfg.num_layers
    valid = np.asarray(batch.attn.slots) >= 0
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5


def test_engine_with_insm_generates_the_sequential_tokens():
    prompts = [{"prompt_token_ids": list(range(i, i + 20 + 7 * i))} for i in range(6)]
    params = nf.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for name in ("sequential", "insm-d25"):
        llm = nf.LLM("tiny-llama", dtype="float32", max_num_batched_tokens=128, min_bucket=64,
                     max_model_len=256, page_size=4, num_pages=400, schedule=name)
        schedule = llm.engine.runner.schedule
        if name != "sequential":  # the dense batch splits 32 / 96; smaller buckets do not
            assert schedule.for_tokens(128).in_sm_rows == 32
            assert schedule.for_tokens(64).is_sequential
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                    use_tqdm=False)]
    assert outs["insm-d25"] == outs["sequential"]


def test_insm_alias_spec_and_json(tmp_path):
    spec = ScheduleSpec.parse("insm")
    assert (spec.kind, spec.decode_share, spec.alias) == ("insm", 0.375, "insm")
    s = named_schedule("insm", 1024)
    assert (s.name, s.in_sm_rows, s.min_tokens, s.is_sequential) == ("insm", 384, 1024, False)
    assert s.for_tokens(512).is_sequential  # under the dense batch: sequential
    s = named_schedule("insm-d25-min512+graph", 1024)
    assert (s.in_sm_rows, s.min_tokens, s.concurrent) == (256, 512, True)
    assert s.for_tokens(512).in_sm_rows == 128 and s.for_tokens(2048).in_sm_rows == 512
    assert ScheduleSpec.parse(s.name).alias == s.name
    s = named_schedule("insm-d30-nofuse", 1024)
    assert (s.name, s.in_sm_rows, s.in_sm_fused) == ("insm-d30-nofuse", 304, False)
    assert Schedule.from_json(s.to_json()) == s and s.for_tokens(2048).in_sm_fused is False
    path = tmp_path / "spec.json"
    path.write_text(ScheduleSpec.parse("insm-d30").to_json())
    assert named_schedule(str(path), 1024).in_sm_rows == 304


@pytest.mark.parametrize("name", ["insm-d0", "insm-d100", "insm-x"])
def test_bad_insm_forms_fail_in_one_line(name):
    with pytest.raises(ValueError) as e:
        named_schedule(name, 1024)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_in_sm_rows_need_the_sequential_ops():
    with pytest.raises(ValueError, match="in_sm_rows"):
        Schedule("x", T, sequential(T).ops, in_sm_rows=T)
    with pytest.raises(ValueError, match="decode_share applies to kind insm"):
        ScheduleSpec("nano", decode_share=0.5)


def test_what_the_in_sm_layer_cannot_run_fails_naming_the_schedule():
    cfg = nf.load_model("tiny-llama", dtype="float32").config
    run = lambda config, layers=({},) * 2: in_sm.run_layers(  # noqa: E731
        16, list(layers), None, None, [None] * 2, None, config, attention_fn("reference"))
    with pytest.raises(ValueError, match="schedule insm has no sliding windows"):
        run(dataclasses.replace(cfg, sliding_window=8))
    with pytest.raises(ValueError, match="schedule insm runs on one device"):
        run(dataclasses.replace(cfg, tp_axis="tp"))
    with pytest.raises(ValueError, match="schedule insm has no mixture-of-experts"):
        _run("mixed", 16, model="tiny-mixtral")


def test_the_kernel_refuses_what_it_cannot_run_in_one_line():
    """LLaMA-3-8B's heads (the kernel's shapes) with a page table longer than one TMA copy,
    and a GQA layout the kernel does not take: one-line errors before any kernel is built."""
    bf16 = jnp.bfloat16
    a, b = jnp.zeros((8, 4096), bf16), jnp.zeros((4096, 256), bf16)
    q = jnp.zeros((4, 32, 128), bf16)
    pages = jnp.zeros((8, 600, 16, 128), bf16)
    lengths = jnp.ones((4,), jnp.int32)
    with pytest.raises(ValueError, match="at most 256 pages.*max_model_len to 4096 or less"):
        in_sm.kernel_beside(a, b, q, pages, pages, jnp.zeros((4, 512), jnp.int32), lengths)
    with pytest.raises(ValueError, match="does not take 72 query heads"):  # groups of 9
        in_sm.kernel_beside(a, b, jnp.zeros((4, 72, 128), bf16), pages, pages,
                            jnp.zeros((4, 64), jnp.int32), lengths)

"""trace_summary on a hand-written XSpace: two streams whose kernels overlap by a known time."""
from jax.profiler import ProfileData

from profiling.trace_summary import format_summary, kernel_events, kernel_kind, summarize

# Stream 1: gemm [0, 3) us and gemm [5, 6) us; stream 2: attn [2, 6) us. Busy 6 us, summed
# 8 us, two at once during [2, 3) and [5, 6): 2 us. Times in picoseconds from the line start.
XSPACE = """
planes {
  name: "/device:GPU:0"
  lines { name: "Stream #1(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000 }
    events { metadata_id: 1 offset_ps: 5000000 duration_ps: 1000000 } }
  lines { name: "Stream #2(compute)" timestamp_ns: 1000
    events { metadata_id: 2 offset_ps: 2000000 duration_ps: 4000000 } }
  lines { name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 9000000 } }
  event_metadata { key: 1 value { id: 1 name: "gemm" } }
  event_metadata { key: 2 value { id: 2 name: "attn" } }
}
"""


def test_overlap_of_two_streams():
    events = kernel_events(ProfileData.from_text_proto(XSPACE))
    assert sorted(n for n, _, _ in events) == ["attn", "gemm", "gemm"]  # not the "XLA Ops" line
    s = summarize(events, steps=2)
    assert abs(s["busy_ms"] - 0.003) < 1e-9 and abs(s["kernel_ms"] - 0.004) < 1e-9
    assert abs(s["overlap_ms"] - 0.001) < 1e-9 and s["kernels"] == 1.5
    assert [n for n, _ in s["top"]] == ["gemm", "attn"]
    assert "2 at once 0.00 ms" in format_summary(s)


def test_kernel_kinds_add_up_across_layers():
    assert kernel_kind("loop_scatter_fusion_12") == "loop_scatter_fusion"
    assert kernel_kind("input_reduce_fusion.3_1") == "input_reduce_fusion"
    assert kernel_kind("nvjet_tst_128x256") == "nvjet_tst_128x256"
    events = [("loop_scatter_fusion_1", 0, 10), ("loop_scatter_fusion_2", 20, 30),
              ("gemm", 40, 55)]
    (kind, ms), _ = summarize(events)["top"]
    assert kind == "loop_scatter_fusion" and abs(ms - 20e-6) < 1e-12


def test_span_and_idle_before_each_kind():
    # a [0, 10), b [15, 20) and, overlapping nothing, a [30, 40) and b [35, 45) ns: the GPU
    # idles 5 ns before b and 10 ns before a, over a 45 ns span.
    events = [("a_1", 0, 10), ("b", 15, 20), ("a_2", 30, 40), ("b", 35, 45)]
    s = summarize(events)
    assert abs(s["span_ms"] - 45e-6) < 1e-12 and abs(s["busy_ms"] - 30e-6) < 1e-12
    assert [(n, round(t * 1e6)) for n, t in s["idle_before"]] == [("a", 10), ("b", 5)]
    text = format_summary(s)
    assert "busy 0.00 ms of 0.00" in text and "idle before: a 0.00" in text

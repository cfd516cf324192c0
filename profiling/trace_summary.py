"""What a profiler trace says about kernel overlap on the GPU.

    python3 profiling/trace_summary.py TRACE_DIR [--steps=N]

Reads the XSpace (`*.xplane.pb`) that `jax.profiler.trace` wrote, takes the kernel events of
the GPU plane's stream lines, and reports per step: the kernels, the time some kernel ran
(busy) of the span from the first kernel's start to the last one's end, the sum of kernel
durations, how long two or more ran at once (the overlap the nano-batch pipeline is after), the
kernels that took the most time and those the GPU sat idle before the most (a launch the host
or a graph boundary held back). No dependency beyond
jaxlib (`jax.profiler.ProfileData`).
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys


def kernel_events(data, plane_prefix: str = "/device:GPU"):
    """[(name, start_ns, end_ns)] of every event on the stream lines of the first plane whose
    name starts with `plane_prefix`."""
    for plane in data.planes:
        if plane.name.startswith(plane_prefix):
            return [(e.name, e.start_ns, e.start_ns + e.duration_ns) for line in plane.lines
                    if line.name.startswith("Stream") for e in line.events]
    raise ValueError(f"no plane named {plane_prefix}* in the trace")


def kernel_kind(name: str) -> str:
    """A kernel's name without XLA's instance numbers ("loop_scatter_fusion_12" and
    "loop_scatter_fusion.3" -> "loop_scatter_fusion"), so a step's 32 layers add up."""
    return re.sub(r"([._]\d+)+$", "", name)


def summarize(events, steps: int = 1, top: int = 10) -> dict:
    """Busy time, summed kernel time, time with >= 2 kernels running and the top kernel kinds,
    all per step (ms)."""
    edges = sorted([(s, 1) for _, s, _ in events] + [(e, -1) for _, _, e in events])
    busy = overlap = 0.0
    active, last = 0, None
    for t, delta in edges:  # sweep: how many kernels run between consecutive edges
        if last is not None:
            busy += (t - last) * (active >= 1)
            overlap += (t - last) * (active >= 2)
        active, last = active + delta, t
    by_name = collections.defaultdict(float)
    idle_before = collections.defaultdict(float)  # GPU idle that ended with this kind's start
    reached = None  # the latest end so far
    for name, s, e in sorted(events, key=lambda x: x[1]):
        by_name[kernel_kind(name)] += e - s
        if reached is not None and s > reached:
            idle_before[kernel_kind(name)] += s - reached
        reached = e if reached is None else max(reached, e)
    total = sum(by_name.values())
    per = 1e-6 / steps  # ns -> ms per step

    def ranked(ms_by_kind):
        return sorted(((n, t * per) for n, t in ms_by_kind.items()), key=lambda x: -x[1])

    span = (max(e for _, _, e in events) - min(s for _, s, _ in events)) if events else 0
    return {"kernels": len(events) / steps, "busy_ms": busy * per, "kernel_ms": total * per,
            "overlap_ms": overlap * per, "span_ms": span * per, "top": ranked(by_name)[:top],
            "idle_before": ranked(idle_before)[:3]}


def summarize_dir(trace_dir: str, steps: int = 1) -> dict:
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return summarize(kernel_events(ProfileData.from_file(max(paths, key=os.path.getmtime))),
                     steps)


def format_summary(s: dict) -> str:
    top = "; ".join(f"{n[:60]} {t:.2f}" for n, t in s["top"])
    idle = "; ".join(f"{n[:60]} {t:.2f}" for n, t in s["idle_before"])
    return (f"{s['kernels']:.0f} kernels, busy {s['busy_ms']:.2f} ms of {s['span_ms']:.2f}, "
            f"kernels {s['kernel_ms']:.2f} ms, >= 2 at once {s['overlap_ms']:.2f} ms | top: {top}"
            f" | idle before: {idle}")


if __name__ == "__main__":
    steps = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--steps=")), 1))
    print(format_summary(summarize_dir(sys.argv[1], steps)))

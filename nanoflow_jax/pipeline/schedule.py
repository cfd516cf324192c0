"""A nano-batch schedule is data: per layer, an ordered list of nano-ops over token ranges.

A nano-op applies one of the layer's ops to the tokens [start, end) of the dense batch:

    qkv       pre-attention norm + the fused q/k/v GEMM, then RoPE
    attn      KV write + attention of those query rows (decode and prefill rows alike)
    o_proj    the output projection GEMM + residual
    up_gate   pre-MLP norm + the fused gate/up GEMM
    down      SwiGLU + the down GEMM + residual

`stream` names the GPU stream the op is issued on (0 = XLA's default; ops on different
non-zero streams may run concurrently when nothing orders them), `sm_share` the fraction of
SMs a kernel may use (kept for the auto-search; the executor does not enforce it yet).

The same op list is used for every layer. Token boundaries are given for `num_tokens`; for
another bucket size they scale proportionally (rounded to a multiple of 16), and a bucket
smaller than `min_tokens` runs the sequential schedule, where splitting cannot pay.
"""
from __future__ import annotations

import dataclasses
import json

OPS = ("qkv", "attn", "o_proj", "up_gate", "down")  # data-flow order within a token


@dataclasses.dataclass(frozen=True)
class NanoOp:
    op: str
    start: int
    end: int
    stream: int = 0
    sm_share: float = 1.0
    # Ops with the same group > 0 form one XLA scheduling group (`_scheduling_group_id`):
    # XLA's scheduler keeps them together, so their async stream calls are in flight at once.
    group: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown nano-op {self.op!r}; ops: {', '.join(OPS)}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"nano-op {self.op} has an empty or negative range "
                             f"[{self.start}, {self.end})")
        if not 0 < self.sm_share <= 1:
            raise ValueError(f"sm_share must be in (0, 1], got {self.sm_share}")
        if self.group < 0:
            raise ValueError(f"group must be >= 0, got {self.group}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    num_tokens: int  # the dense batch the boundaries are written for
    ops: tuple[NanoOp, ...]
    min_tokens: int = 0  # smaller buckets run sequentially

    def __post_init__(self):
        # Every op kind covers [0, num_tokens) exactly once, and a token's ops come in order.
        for kind in OPS:
            ranges = sorted((o.start, o.end) for o in self.ops if o.op == kind)
            covered = 0
            for s, e in ranges:
                if s != covered:
                    raise ValueError(f"schedule {self.name!r}: {kind} ranges leave a gap or "
                                     f"overlap at token {covered}")
                covered = e
            if covered != self.num_tokens:
                raise ValueError(f"schedule {self.name!r}: {kind} covers {covered} of "
                                 f"{self.num_tokens} tokens")
        seen: dict[str, list[tuple[int, int]]] = {k: [] for k in OPS}
        for o in self.ops:
            if o.op != OPS[0]:
                before = OPS[OPS.index(o.op) - 1]
                if not _covers(seen[before], o.start, o.end):
                    raise ValueError(f"schedule {self.name!r}: {o.op}[{o.start}:{o.end}] runs "
                                     f"before its tokens' {before}")
            seen[o.op].append((o.start, o.end))

    @property
    def is_sequential(self) -> bool:
        return len(self.ops) == len(OPS)

    def for_tokens(self, num_tokens: int) -> "Schedule":
        """The schedule with its boundaries scaled to a bucket of `num_tokens`."""
        if num_tokens == self.num_tokens:
            return self
        if num_tokens < self.min_tokens or self.is_sequential:
            return sequential(num_tokens)

        def scale(b: int) -> int:
            if b in (0, self.num_tokens):
                return b * num_tokens // self.num_tokens
            return min(max(16, round(b * num_tokens / self.num_tokens / 16) * 16), num_tokens)

        ops = []
        for o in self.ops:
            s, e = scale(o.start), scale(o.end)
            if s < e:
                ops.append(dataclasses.replace(o, start=s, end=e))
        return Schedule(self.name, num_tokens, tuple(ops), self.min_tokens)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "num_tokens": self.num_tokens,
                           "min_tokens": self.min_tokens,
                           "ops": [dataclasses.asdict(o) for o in self.ops]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        d = json.loads(text)
        return cls(d["name"], d["num_tokens"], tuple(NanoOp(**o) for o in d["ops"]),
                   d.get("min_tokens", 0))


def _covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    covered = [False] * (end - start)
    for s, e in ranges:
        for t in range(max(s, start), min(e, end)):
            covered[t - start] = True
    return all(covered)


def sequential(num_tokens: int) -> Schedule:
    """The baseline: every op over the whole batch, one after the other."""
    return Schedule("sequential", num_tokens, tuple(NanoOp(k, 0, num_tokens) for k in OPS))


def nano_batched(num_tokens: int, num_nano: int, overlap: bool = True,
                 grouped: bool = False) -> Schedule:
    """`num_nano` equal nano-batches, software-pipelined one op apart.

    Nano-batch i's attention is issued between nano-batch i+1's qkv and o_proj GEMMs, and
    its MLP GEMMs follow, so the memory-bound attention of one nano-batch can run beside the
    compute-bound GEMMs of the next (NanoFlow's overlap for LLaMA-3-8B). The GEMMs go to
    stream 1 and the attention stays on the default stream (docs/overlap.md has what each
    placement measured). With `overlap=False` every op goes to the default stream: the
    cost of splitting alone (the paper's "nano-batch only" ablation). With `grouped=True`
    attention goes to stream 2 and the ops issued in one tick form one XLA scheduling group
    (the variant that overlapped best in `benchmarks/overlap_micro.py`).
    """
    if grouped and not overlap:
        raise ValueError("a grouped schedule overlaps: grouped needs overlap=True")
    if not 1 <= num_nano <= num_tokens // 16:
        raise ValueError(f"cannot split {num_tokens} tokens into {num_nano} nano-batches")
    bounds = [round(i * num_tokens / num_nano / 16) * 16 for i in range(num_nano)] + [num_tokens]
    gemm, attn = (1, 2 if grouped else 0) if overlap else (0, 0)
    ops = []
    # Stage k of nano-batch i runs in "tick" i + k: ticks interleave the nano-batches.
    stages = [("qkv", gemm), ("attn", attn), ("o_proj", gemm), ("up_gate", gemm), ("down", gemm)]
    for tick in range(num_nano + len(stages) - 1):
        for i in range(num_nano):
            k = tick - i
            if 0 <= k < len(stages):
                op, stream = stages[k]
                ops.append(NanoOp(op, bounds[i], bounds[i + 1], stream,
                                  group=tick + 1 if grouped else 0))
    name = f"nano{num_nano}" + ("-grouped" if grouped else "" if overlap else "-nooverlap")
    return Schedule(name, num_tokens, tuple(ops), min_tokens=64 * num_nano)


def named_schedule(name: str, num_tokens: int) -> Schedule:
    """`sequential`, `nanoN`, `nanoN-nooverlap` or `nanoN-grouped` (N = 2..4), or a path to a
    schedule JSON."""
    if name == "sequential":
        return sequential(num_tokens)
    if name.startswith("nano"):
        n, _, rest = name[4:].partition("-")
        if n.isdigit() and rest in ("", "nooverlap", "grouped"):
            return nano_batched(num_tokens, int(n), overlap=rest != "nooverlap",
                                grouped=rest == "grouped")
    if name.endswith(".json"):
        with open(name) as f:
            return Schedule.from_json(f.read()).for_tokens(num_tokens)
    raise ValueError(f"unknown schedule {name!r}: sequential, nano2..nano4, nanoN-nooverlap, nanoN-grouped, "
                     f"or a .json file")

"""A nano-batch schedule is data: an ordered list of nano-ops over token ranges, per layer.

A nano-op applies one of the layer's ops to the tokens [start, end) of the dense batch:

    qkv       pre-attention norm + the fused q/k/v GEMM, then RoPE
    attn      KV write + attention of those query rows (decode and prefill rows alike)
    o_proj    the output projection GEMM + residual
    up_gate   pre-MLP norm + the fused gate/up GEMM
    down      SwiGLU + the down GEMM + residual

and under tensor parallelism the two all-reduces of Megatron's layout, ops of their own so
that one nano-batch's collective can run while another nano-batch's GEMMs do:

    ar_attn   the residual stream of those rows summed over the shards, as qkv's norm reads it
              (after the previous layer's down, or the embedding)
    ar_mlp    likewise after o_proj, as up_gate's norm reads it

A schedule has both collective ops or neither. The executor adds them to a schedule without
them when it runs on a mesh (each just before the op that reads it: `with_collectives`) and
drops them on one device (nothing to reduce), so every schedule runs on both. Collectives
always go on stream 0 with all SMs: XLA issues them as async collectives on its own
communication stream, and its latency hiding scheduler runs them under independent work.

`stream` names the GPU stream the op is issued on (0 = XLA's default; ops on different
non-zero streams may run concurrently when nothing orders them), `sm_share` the fraction of
SMs a kernel may use, on a GPU: decode attention then runs that share of the SMs' worth of
persistent programs, a GEMM runs as a persistent Mosaic GPU GEMM on that many CTAs.

The op list is one *window*, repeated for every layer: window w runs each op on layer
w + op.layer, where `layer` is 0 (this window's layer) or 1 (the next one); ops of layers
outside the model are skipped, so a pipeline that crosses layer boundaries (nano-batch A's
next-layer qkv beside nano-batch B's attention) has its prologue and epilogue for free.

`concurrent` asks XLA to let kernels with no data dependency between them run at once inside
its CUDA graphs (command buffers in CONCURRENT scheduling mode): overlap without streams.

Token boundaries are given for `num_tokens`; for another bucket size they scale
proportionally (rounded to a multiple of 16), and a bucket smaller than `min_tokens` runs the
sequential schedule, where splitting cannot pay.

The hand-written families below are built from a `ScheduleSpec` or its short alias
(`pipeline/spec.py`, whose docstring is the table of every form `--schedule` takes); the
auto-search (`pipeline/autosearch.py`) writes schedules of its own.
"""
from __future__ import annotations

import dataclasses
import json

OPS = ("qkv", "attn", "o_proj", "up_gate", "down")  # data-flow order within a token
COLLECTIVES = ("ar_attn", "ar_mlp")  # under tensor parallelism, before qkv and up_gate
CHAIN_TP = ("ar_attn", "qkv", "attn", "o_proj", "ar_mlp", "up_gate", "down")
REDUCES_FOR = {"qkv": "ar_attn", "up_gate": "ar_mlp"}  # an op -> the collective it reads


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
    layer: int = 0  # 0: the window's layer; 1: the next layer (a pipeline across layers)

    def __post_init__(self):
        if self.op not in CHAIN_TP:
            raise ValueError(f"unknown nano-op {self.op!r}; ops: {', '.join(CHAIN_TP)}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"nano-op {self.op} has an empty or negative range "
                             f"[{self.start}, {self.end})")
        if not 0 < self.sm_share <= 1:
            raise ValueError(f"sm_share must be in (0, 1], got {self.sm_share}")
        if self.group < 0:
            raise ValueError(f"group must be >= 0, got {self.group}")
        if self.layer not in (0, 1):
            raise ValueError(f"layer must be 0 (this window's) or 1 (the next), got {self.layer}")
        if self.op in COLLECTIVES and (self.stream != 0 or self.sm_share != 1):
            raise ValueError(f"collective {self.op} runs on stream 0 with sm_share 1 (XLA's "
                             f"async collectives), got stream {self.stream}, sm_share "
                             f"{self.sm_share}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    num_tokens: int  # the dense batch the boundaries are written for
    ops: tuple[NanoOp, ...]
    min_tokens: int = 0  # smaller buckets run sequentially
    concurrent: bool = False  # XLA may run independent kernels at once (see the module doc)
    # > 0: every layer runs `pipeline/in_sm.py`'s in-SM layer, its decode nano-batch the first
    # this many rows (the ops are then the sequential ones: the layer orders its own work).
    in_sm_rows: int = 0
    in_sm_fused: bool = True  # False: the in-SM order with the two as separate kernels

    def __post_init__(self):
        if self.in_sm_rows and not (0 < self.in_sm_rows < self.num_tokens
                                    and self.ops == sequential(self.num_tokens).ops):
            raise ValueError(f"schedule {self.name!r}: in_sm_rows must be in 1.."
                             f"{self.num_tokens - 1} with the sequential ops, got "
                             f"{self.in_sm_rows}")
        collectives = {o.op for o in self.ops} & set(COLLECTIVES)
        if collectives and collectives != set(COLLECTIVES):
            missing = sorted(set(COLLECTIVES) - collectives)
            raise ValueError(f"schedule {self.name!r} has {', '.join(sorted(collectives))} "
                             f"but not {', '.join(missing)}: both collectives or neither")
        # Every op kind covers [0, num_tokens) exactly once, and a token's ops come in order.
        for kind in self.chain:
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
        _check_order(self)

    @property
    def has_collectives(self) -> bool:
        return any(o.op in COLLECTIVES for o in self.ops)

    @property
    def chain(self) -> tuple[str, ...]:
        """The op kinds of one token's layer, in data-flow order."""
        return CHAIN_TP if self.has_collectives else OPS

    @property
    def is_sequential(self) -> bool:
        """One op of each kind over the whole batch, in order: no splitting, no streams."""
        return not self.in_sm_rows and len(self.ops) == len(self.chain) and all(
            o.layer == 0 and o.stream == 0 for o in self.ops)

    def with_collectives(self) -> Schedule:
        """The schedule with its all-reduces as ops: itself when it has them, else each just
        before the op that reads it (same rows, same layer)."""
        if self.has_collectives:
            return self
        ops = []
        for o in self.ops:
            if o.op in REDUCES_FOR:
                ops.append(NanoOp(REDUCES_FOR[o.op], o.start, o.end, layer=o.layer))
            ops.append(o)
        return dataclasses.replace(self, ops=tuple(ops))

    def without_collectives(self) -> Schedule:
        """The schedule for one device: its collective ops dropped."""
        if not self.has_collectives:
            return self
        return dataclasses.replace(self, ops=tuple(o for o in self.ops
                                                   if o.op not in COLLECTIVES))

    @property
    def windows(self) -> int:
        """How many windows run before the first layer's: the pipeline's prologue."""
        return max(o.layer for o in self.ops)

    def flatten(self, num_layers: int) -> list[tuple[int, NanoOp]]:
        """Every (window, op) in execution order; the op runs on layer window + op.layer."""
        return [(w, o) for w in range(-self.windows, num_layers) for o in self.ops
                if 0 <= w + o.layer < num_layers]

    def for_tokens(self, num_tokens: int) -> "Schedule":
        """The schedule with its boundaries scaled to a bucket of `num_tokens`."""
        if num_tokens == self.num_tokens:
            return self
        if num_tokens < self.min_tokens or self.is_sequential:
            return sequential(num_tokens, self.concurrent)

        def scale(b: int) -> int:
            if b in (0, self.num_tokens):
                return b * num_tokens // self.num_tokens
            return min(max(16, round(b * num_tokens / self.num_tokens / 16) * 16), num_tokens)

        ops = []
        for o in self.ops:
            s, e = scale(o.start), scale(o.end)
            if s < e:
                ops.append(dataclasses.replace(o, start=s, end=e))
        in_sm_rows = self.in_sm_rows and min(scale(self.in_sm_rows), num_tokens - 16)
        if self.in_sm_rows and in_sm_rows < 16:  # no room for two nano-batches
            return sequential(num_tokens, self.concurrent)
        return dataclasses.replace(self, num_tokens=num_tokens, ops=tuple(ops),
                                   in_sm_rows=in_sm_rows)

    def compiler_options(self) -> dict[str, str]:
        """XLA options for the step that runs this schedule (GPU)."""
        if self.concurrent:
            return {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
        return {}

    def to_json(self) -> str:
        in_sm = ({"in_sm_rows": self.in_sm_rows, "in_sm_fused": self.in_sm_fused}
                 if self.in_sm_rows else {})
        return json.dumps({"name": self.name, "num_tokens": self.num_tokens,
                           "min_tokens": self.min_tokens, "concurrent": self.concurrent,
                           **in_sm, "ops": [dataclasses.asdict(o) for o in self.ops]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        d = json.loads(text)
        return cls(d["name"], d["num_tokens"], tuple(NanoOp(**o) for o in d["ops"]),
                   d.get("min_tokens", 0), d.get("concurrent", False), d.get("in_sm_rows", 0),
                   d.get("in_sm_fused", True))


def _check_order(schedule: Schedule) -> None:
    """Replays the schedule over a few layers and checks that every token's ops come in
    data-flow order (layer by layer), and that within a layer attention runs in increasing
    token order: a prompt chunk cut by a boundary needs its earlier rows' K/V in the cache."""
    chain = schedule.chain
    bounds = sorted({b for o in schedule.ops for b in (o.start, o.end)})
    segments = list(zip(bounds[:-1], bounds[1:]))
    done = {seg: (0, 0) for seg in segments}  # next (layer, op index) each segment must run
    num_layers = schedule.windows + 3
    last_attn = {}
    for w, o in schedule.flatten(num_layers):
        layer, k = w + o.layer, chain.index(o.op)
        for seg in segments:
            if o.start <= seg[0] and seg[1] <= o.end and done[seg] != (layer, k):
                want_layer, want_k = done[seg]
                raise ValueError(
                    f"schedule {schedule.name!r}: {o.op}[{o.start}:{o.end}] of layer {layer} "
                    f"runs before its tokens' {chain[want_k]} of layer {want_layer}")
            if o.start <= seg[0] and seg[1] <= o.end:
                done[seg] = (layer + (k + 1) // len(chain), (k + 1) % len(chain))
        if o.op == "attn":
            if o.start < last_attn.get(layer, 0):
                raise ValueError(f"schedule {schedule.name!r}: attention of tokens {o.start}.. "
                                 f"runs after that of later tokens in layer {layer}")
            last_attn[layer] = o.end
    if any(d != (num_layers, 0) for d in done.values()):
        raise ValueError(f"schedule {schedule.name!r} leaves some tokens' ops unrun")


def sequential(num_tokens: int, concurrent: bool = False) -> Schedule:
    """The baseline: every op over the whole batch, one after the other."""
    return Schedule("sequential" + ("+graph" if concurrent else ""), num_tokens,
                    tuple(NanoOp(k, 0, num_tokens) for k in OPS), concurrent=concurrent)


def nano_batched(num_tokens: int, num_nano: int, overlap: bool = True,
                 grouped: bool = False, collectives: bool = False) -> Schedule:
    """`num_nano` equal nano-batches, software-pipelined one op apart.

    Nano-batch i's attention is issued between nano-batch i+1's qkv and o_proj GEMMs, and
    its MLP GEMMs follow, so the memory-bound attention of one nano-batch can run beside the
    compute-bound GEMMs of the next (NanoFlow's overlap for LLaMA-3-8B). The GEMMs go to
    stream 1 and the attention stays on the default stream (docs/overlap.md has what each
    placement measured). With `overlap=False` every op goes to the default stream: the
    cost of splitting alone (the paper's "nano-batch only" ablation). With `grouped=True`
    attention goes to stream 2 and the ops issued in one tick form one XLA scheduling group
    (the variant that overlapped best in `benchmarks/overlap_micro.py`).
    With `collectives` the two all-reduces are stages of their own (ar_attn before qkv,
    ar_mlp between o_proj and up_gate): nano-batch i's all-reduce is issued in the tick of
    nano-batch i+1's GEMM, on which it does not depend, so the two can run at once.
    """
    if grouped and not overlap:
        raise ValueError("a grouped schedule overlaps: grouped needs overlap=True")
    bounds = _bounds(num_tokens, num_nano)
    gemm, attn = (1, 2 if grouped else 0) if overlap else (0, 0)
    ops = []
    # Stage k of nano-batch i runs in "tick" i + k: ticks interleave the nano-batches.
    stages = [("qkv", gemm), ("attn", attn), ("o_proj", gemm), ("up_gate", gemm), ("down", gemm)]
    if collectives:
        stages = stages[:3] + [("ar_mlp", 0)] + stages[3:]
        stages.insert(0, ("ar_attn", 0))
    for tick in range(num_nano + len(stages) - 1):
        for i in range(num_nano):
            k = tick - i
            if 0 <= k < len(stages):
                op, stream = stages[k]
                ops.append(NanoOp(op, bounds[i], bounds[i + 1], stream,
                                  group=tick + 1 if grouped and stream else 0))
    name = (f"nano{num_nano}" + ("-grouped" if grouped else "" if overlap else "-nooverlap")
            + ("-ar" if collectives else ""))
    return Schedule(name, num_tokens, tuple(ops), min_tokens=64 * num_nano)


def _bounds(num_tokens: int, num_nano: int) -> list[int]:
    if not 1 <= num_nano <= num_tokens // 16:
        raise ValueError(f"cannot split {num_tokens} tokens into {num_nano} nano-batches")
    return [round(i * num_tokens / num_nano / 16) * 16 for i in range(num_nano)] + [num_tokens]


def nano_pipelined(num_tokens: int, num_nano: int, streams: bool = True,
                   concurrent: bool = False, attn_sm_share: float = 1.0,
                   gemm_sm_share: float = 1.0, collectives: bool = False) -> Schedule:
    """`num_nano` nano-batches pipelined across layers, NanoFlow's overlap for LLaMA-3-8B.

    Each layer runs `num_nano` ticks; in tick i nano-batch i's attention runs beside the
    GEMM chain of nano-batch i-1: its o_proj, up/gate and down, then its next layer's qkv
    (nano-batch 0's attention runs beside the last nano-batch's chain of the layer before).
    With `streams` the chain is one call on stream 1 and the attention one call on stream 2,
    the two in one XLA scheduling group: two joins per tick. Without streams (and without
    `concurrent`) the same order runs on one stream: the cost of splitting alone.
    `attn_sm_share` < 1 runs decode attention persistent on that share of the SMs, so the
    GEMMs beside it have the others from the start (NanoFlow partitions SMs the same way).
    `gemm_sm_share` < 1 partitions the other way round: the GEMMs run persistent on that share
    of the SMs and are issued first in each tick, so the attention issued after them finds the
    remaining SMs free; with both shares each half is persistent on its own SMs (docs/overlap.md
    has what each measured). With `collectives` the chain holds the all-reduces (o_proj,
    ar_mlp, up_gate, down, ar_attn, qkv), each on stream 0 between the chain's stream calls,
    beside the tick's attention.
    """
    bounds = _bounds(num_tokens, num_nano)
    gemm, attn = (1, 2) if streams else (0, 0)
    rows = lambda i: (bounds[i], bounds[i + 1])  # noqa: E731
    ops = []
    # The window is ticks 1..N of layer l: tick N is tick 0 of layer l + 1.
    for tick in range(1, num_nano + 1):
        group = tick if streams else 0
        attention = [NanoOp("attn", *rows(tick % num_nano), attn, attn_sm_share, group=group,
                            layer=int(tick == num_nano))]
        kinds = (("o_proj", "ar_mlp", "up_gate", "down", "ar_attn", "qkv") if collectives
                 else ("o_proj", "up_gate", "down", "qkv"))
        chain = [NanoOp(op, *rows(tick - 1), layer=int(op in ("ar_attn", "qkv")),
                        **({} if op in COLLECTIVES else
                           {"stream": gemm, "sm_share": gemm_sm_share, "group": group}))
                 for op in kinds]
        ops += chain + attention if gemm_sm_share < 1 else attention + chain
    name = (f"nano{num_nano}-pipe" + ("" if streams else "-nostreams")
            + (f"-sm{round(100 * attn_sm_share)}" if attn_sm_share < 1 else "")
            + (f"-gemm{round(100 * gemm_sm_share)}" if gemm_sm_share < 1 else "")
            + ("-ar" if collectives else "") + ("+graph" if concurrent else ""))
    return Schedule(name, num_tokens, tuple(ops), min_tokens=64 * num_nano,
                    concurrent=concurrent)

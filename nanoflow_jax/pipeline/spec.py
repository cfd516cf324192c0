"""The schedule as a structured config: `ScheduleSpec`, its short aliases, and `named_schedule`.

A `ScheduleSpec` names one of the hand-written families of `schedule.py` and its knobs; its
`build(num_tokens)` gives the `Schedule` (the op list the executor reads). An alias is a short
string that parses into a spec. This table is the one place the forms are documented:

    form                     ScheduleSpec                     what runs
    -----------------------  -------------------------------  --------------------------------
    sequential               kind="sequential"                every op over the whole batch,
                                                              one after the other
    nanoN                    kind="nano", num_nano=N          N nano-batches one op apart in a
                                                              layer; GEMMs on stream 1
    nanoN-nooverlap          kind="nano", overlap=False       that order on one stream (the
                                                              cost of splitting alone)
    nanoN-grouped            kind="nano", grouped=True        attention on stream 2 too, one
                                                              XLA scheduling group per tick
    nanoN-pipe               kind="pipe", num_nano=N          across layers: nano-batch i's
                                                              attention beside nano-batch
                                                              i-1's GEMM chain; two streams,
                                                              one scheduling group per tick
    nanoN-pipe-nostreams     kind="pipe", streams=False       the pipelined order, one stream
    nanoN-pipe[...]-smP      attention_sm_share=P/100         decode attention persistent on
                                                              P % of the SMs
    nanoN-pipe[...]-gemmP    gemm_sm_share=P/100              GEMMs persistent on P % of the
                             (after -smP when both)           SMs, issued before attention
    insm                     kind="insm"                      each layer's decode attention
                                                              inside the prompt rows' up/gate
                                                              GEMM, one kernel on every SM
                                                              (`pipeline/in_sm.py`); buckets
                                                              under the dense batch run
                                                              sequentially unless -minM
    insm-dP                  decode_share=P/100               its decode nano-batch: the first
                                                              P % of the rows (default 37.5)
    insm[-dP]-nofuse         fused=False                      that order with the GEMM and the
                                                              attention as two kernels (the
                                                              cost of splitting alone)
    nanoN[...]-ar,           collectives=True                 under tensor parallelism the
    nanoN-pipe[...]-ar       (after the family's suffixes)    all-reduces are placed by the
                                                              family: nano, a tick after
                                                              their producer, beside the next
                                                              nano-batch's GEMM; pipe, in the
                                                              GEMM chain, beside attention
    any nanoN form + -minM   min_tokens=M                     buckets under M tokens run
                                                              sequentially (default 64·N)
    any form + "+graph"      concurrent=True                  XLA may run independent kernels
                                                              at once in its CUDA graphs
    PATH.json                -                                a `Schedule` JSON (has "ops") or
                                                              a `ScheduleSpec` JSON ("kind")
    auto                     -                                searched at start-up from this
                                                              device's cached op profile
                                                              (`pipeline.autosearch`)
    auto:PROFILE.json        -                                searched from that profile

Example: `nano2-pipe-nostreams-sm33-gemm67-min1024+graph` is
`ScheduleSpec(kind="pipe", num_nano=2, streams=False, attention_sm_share=0.33,
gemm_sm_share=0.67, min_tokens=1024, concurrent=True)`. Suffixes come in the table's order.

Collectives. Under tensor parallelism every form runs with Megatron's two all-reduces per layer
and nano-batch as ops of the schedule (`ar_attn`, `ar_mlp`: `schedule.py`): a form without
`-ar` gets each just before the op that reads it, `-ar` forms and searched or JSON schedules
place them themselves. On one device the collective ops are dropped, so `-ar` changes nothing
there. XLA runs each as an async all-reduce, and the latency hiding scheduler
(`parallel.compiler_options`) puts independent GEMMs of other nano-batches under it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

from nanoflow_jax.pipeline.schedule import Schedule, nano_batched, nano_pipelined, sequential

KINDS = ("sequential", "nano", "pipe", "insm")
VALID_FORMS = ("sequential, nanoN[-nooverlap|-grouped][-ar], "
               "nanoN-pipe[-nostreams][-smP][-gemmP][-ar], insm[-dP][-nofuse], any nanoN or "
               "insm form with -minM, any form with +graph, PATH.json (a Schedule or a "
               "ScheduleSpec), auto or auto:PROFILE.json")


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """One hand-written schedule family and its knobs (the alias table is the module doc)."""

    kind: str = "sequential"  # sequential | nano (one layer) | pipe (across layers) | insm
    num_nano: int = 2  # nano-batches of equal size (nano, pipe)
    overlap: bool = True  # nano: GEMMs on their own stream (False: one stream)
    grouped: bool = False  # nano: attention on stream 2, one scheduling group per tick
    streams: bool = True  # pipe: GEMM chain on stream 1, attention on stream 2
    attention_sm_share: float = 1.0  # pipe: decode attention persistent on this share of SMs
    gemm_sm_share: float = 1.0  # pipe: GEMMs persistent on this share of the SMs
    decode_share: float = 0.375  # insm: the decode nano-batch's share of the rows
    fused: bool = True  # insm: the GEMM and the attention in one kernel (False: two)
    # Buckets under this run sequentially (0: the family's 64·num_nano; insm: the dense batch).
    min_tokens: int = 0
    concurrent: bool = False  # XLA may run independent kernels at once (the "+graph" suffix)
    collectives: bool = False  # nano, pipe: the family places the all-reduces (the "-ar")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ScheduleSpec.kind must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")
        only = {"num_nano": ("nano", "pipe"), "overlap": ("nano",), "grouped": ("nano",),
                "streams": ("pipe",), "attention_sm_share": ("pipe",),
                "gemm_sm_share": ("pipe",), "decode_share": ("insm",), "fused": ("insm",),
                "min_tokens": ("nano", "pipe", "insm"),
                "collectives": ("nano", "pipe")}
        default = ScheduleSpec.__dataclass_fields__
        for name, kinds in only.items():
            if self.kind not in kinds and getattr(self, name) != default[name].default:
                raise ValueError(f"ScheduleSpec.{name} applies to kind "
                                 f"{' or '.join(kinds)}, not {self.kind!r}")
        if self.num_nano < 1:
            raise ValueError(f"ScheduleSpec.num_nano must be >= 1, got {self.num_nano}")
        for name in ("attention_sm_share", "gemm_sm_share", "decode_share"):
            share = getattr(self, name)
            if not 0 < share <= 1:
                raise ValueError(f"ScheduleSpec.{name} must be in (0, 1], got {share}")
        if self.min_tokens < 0:
            raise ValueError(f"ScheduleSpec.min_tokens must be >= 0, got {self.min_tokens}")
        if self.grouped and not self.overlap:
            raise ValueError("ScheduleSpec.grouped needs overlap=True (a grouped schedule "
                             "overlaps)")

    @property
    def alias(self) -> str:
        """The short name that parses back into this spec."""
        if self.kind == "sequential":
            name = "sequential"
        elif self.kind == "insm":
            name = "insm" + (f"-d{_percent(self.decode_share)}"
                             if self.decode_share != ScheduleSpec.decode_share else "")
            name += "" if self.fused else "-nofuse"
        elif self.kind == "nano":
            name = f"nano{self.num_nano}" + ("-grouped" if self.grouped else
                                             "" if self.overlap else "-nooverlap")
        else:
            name = (f"nano{self.num_nano}-pipe" + ("" if self.streams else "-nostreams")
                    + (f"-sm{_percent(self.attention_sm_share)}"
                       if self.attention_sm_share < 1 else "")
                    + (f"-gemm{_percent(self.gemm_sm_share)}" if self.gemm_sm_share < 1 else ""))
        if self.collectives:
            name += "-ar"
        if self.min_tokens:
            name += f"-min{self.min_tokens}"
        return name + ("+graph" if self.concurrent else "")

    def build(self, num_tokens: int) -> Schedule:
        """The `Schedule` of this spec for a dense batch of `num_tokens`, named by its alias."""
        if self.kind == "sequential":
            return sequential(num_tokens, self.concurrent)
        if self.kind == "insm":
            rows = min(max(16, round(self.decode_share * num_tokens / 16) * 16), num_tokens - 16)
            if rows < 16:  # a batch too small for two nano-batches
                return dataclasses.replace(sequential(num_tokens, self.concurrent),
                                           name=self.alias)
            return dataclasses.replace(sequential(num_tokens, self.concurrent), name=self.alias,
                                       min_tokens=self.min_tokens or num_tokens,
                                       in_sm_rows=rows, in_sm_fused=self.fused)
        if self.kind == "nano":
            s = nano_batched(num_tokens, self.num_nano, self.overlap, self.grouped,
                             self.collectives)
            s = dataclasses.replace(s, concurrent=self.concurrent)
        else:
            s = nano_pipelined(num_tokens, self.num_nano, self.streams, self.concurrent,
                               self.attention_sm_share, self.gemm_sm_share, self.collectives)
        return dataclasses.replace(s, name=self.alias,
                                   min_tokens=max(s.min_tokens, self.min_tokens))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ScheduleSpec field(s) {', '.join(sorted(unknown))}; "
                             f"fields: {', '.join(cls.__dataclass_fields__)}")
        return cls(**d)

    @classmethod
    def parse(cls, alias: str) -> "ScheduleSpec":
        """The spec of an alias (the module doc's table); a one-line error otherwise."""
        m = _ALIAS.fullmatch(alias)
        if not m:
            raise ValueError(f"unknown schedule {alias!r}; valid forms: {VALID_FORMS}")
        shares = [int(p) / 100 if p else 1.0 for p in (m["sm"], m["gemm"])]
        if not all(0 < share <= 1 for share in shares):
            raise ValueError(f"schedule {alias!r}: an SM share (-smP, -gemmP) must be 1..100 %")
        concurrent = bool(m["graph"])
        if m["seq"]:
            return cls("sequential", concurrent=concurrent)
        if m["insm"]:
            share = int(m["d"]) / 100 if m["d"] else cls.decode_share
            if not 0 < share < 1:
                raise ValueError(f"schedule {alias!r}: -dP (the decode nano-batch) must be "
                                 f"1..99 %")
            return cls("insm", decode_share=share, fused=not m["nofuse"],
                       min_tokens=int(m["insm_min"] or 0), concurrent=concurrent)
        kw = {"num_nano": int(m["n"]), "min_tokens": int(m["min"] or 0),
              "concurrent": concurrent, "collectives": bool(m["ar"])}
        if m["pipe"]:
            return cls("pipe", streams=not m["nostreams"], attention_sm_share=shares[0],
                       gemm_sm_share=shares[1], **kw)
        return cls("nano", overlap=m["variant"] != "-nooverlap",
                   grouped=m["variant"] == "-grouped", **kw)


def _percent(share: float) -> int:
    return round(100 * share)


_ALIAS = re.compile(
    r"(?:(?P<seq>sequential)|(?P<insm>insm)(?:-d(?P<d>\d+))?(?P<nofuse>-nofuse)?(?:-min(?P<insm_min>\d+))?"
    r"|nano(?P<n>\d+)(?:(?P<pipe>-pipe(?P<nostreams>-nostreams)?"
    r"(?:-sm(?P<sm>\d+))?(?:-gemm(?P<gemm>\d+))?)|(?P<variant>-nooverlap|-grouped))?"
    r"(?P<ar>-ar)?(?:-min(?P<min>\d+))?)(?P<graph>\+graph)?")


def load_schedule_json(path: str, num_tokens: int) -> Schedule:
    """A `Schedule` JSON (has "ops"; its boundaries scale to `num_tokens`) or a `ScheduleSpec`
    JSON (has "kind")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"schedule file {path!r} not found")
    with open(path) as f:
        d = json.load(f)
    if "ops" in d:
        return Schedule.from_json(json.dumps(d)).for_tokens(num_tokens)
    if "kind" in d:
        return ScheduleSpec.from_dict(d).build(num_tokens)
    raise ValueError(f"{path!r} is neither a Schedule JSON (with 'ops') nor a ScheduleSpec "
                     f"JSON (with 'kind')")


def check_schedule_name(name, num_tokens: int) -> None:
    """Raises ValueError when `name` gives no valid schedule for a dense batch of `num_tokens`
    (`auto` profiles are checked for existence only)."""
    if name == "auto" or (isinstance(name, str) and name.startswith("auto:")):
        path = name.partition(":")[2]
        if path and not os.path.isfile(path):
            raise ValueError(f"profile file {path!r} not found")
        return
    if not isinstance(name, (str, Schedule, ScheduleSpec)):
        raise ValueError(f"a schedule is a string, a ScheduleSpec or a Schedule, got "
                         f"{type(name).__name__}")
    try:
        named_schedule(name, num_tokens)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def named_schedule(name, num_tokens: int, model_config=None, dtype: str = "bfloat16",
                   workload=None, tensor_parallel_size: int | None = None,
                   measure=None) -> Schedule:
    """The `Schedule` for the dense batch `num_tokens` from any form of the module doc's
    table, or from a `ScheduleSpec` / `Schedule` object. `auto` needs `model_config` (and
    takes `dtype`, an `autosearch.Workload` and the tensor-parallel size, None: that of an
    `auto:PROFILE.json`, else 1): it profiles the ops once per device, model, dense batch and
    tensor-parallel size (cached on disk) and searches; with `measure` (`guard.Measure`) the
    searched schedule is kept only when it measures faster than sequential."""
    if isinstance(name, Schedule):
        return name.for_tokens(num_tokens)
    if isinstance(name, ScheduleSpec):
        return name.build(num_tokens)
    if name == "auto" or name.startswith("auto:"):
        if model_config is None:
            raise ValueError("schedule 'auto' needs the model's config (named_schedule("
                             "'auto', num_tokens, model_config=...))")
        from nanoflow_jax.pipeline import autosearch

        return autosearch.auto_schedule(model_config, num_tokens, dtype,
                                        profile_path=name.partition(":")[2] or None,
                                        workload=workload,
                                        tensor_parallel_size=tensor_parallel_size,
                                        measure=measure).schedule
    if name.endswith(".json"):
        return load_schedule_json(name, num_tokens)
    return ScheduleSpec.parse(name).build(num_tokens)

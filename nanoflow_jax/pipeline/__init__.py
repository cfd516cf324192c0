"""Nano-batch pipelines: what a schedule is, how it runs, and how one is searched.

    schedule.py    `Schedule` / `NanoOp`: the op list the executor reads, and the hand-written
                   families (sequential, nano-batched, pipelined across layers)
    spec.py        `ScheduleSpec`, the schedule as a structured config, its short aliases and
                   `named_schedule` (its docstring is the table of every `--schedule` form)
    executor.py    turns a `Schedule` into the function that runs the decoder layers
    profile.py     per-op device times (the auto-search's input) and the profiler
    corun.py       GEMMs timed beside attention, and the overlap efficiency of a pair
    solver.py      the two-stage MILP (scipy.optimize.milp / HiGHS) over a cyclic op graph
    replay.py      checks a solved timeline: SM capacity and dependencies at every instant
    predict.py     predicted times of a timeline or any schedule, with the overlap penalty
    autosearch.py  LLaMA's op graph from a profile, the search, and `schedule="auto"`
    guard.py       the searched schedule and sequential measured, the faster kept
"""

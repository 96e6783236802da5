"""The engine registry: who runs the solve of `purify` (docs/design.md §6).

An engine has `solve(x, score_model, classifier, config, stream, gradient, memory)` (start state ->
final state, differentiable in x as `gradient` asks; None when it cannot run these models, and the
eager engine runs instead), `unsupported(x, noise, gradient, samples)` (why it cannot run a call, or None) and
`clear()` (drop its caches).  Adding one is a module here and a line in ENGINES.  `choose_engine` says
which engine an evaluation should ask for on a device, given how many calls each batch shape gets.
"""
from __future__ import annotations

import shutil
from typing import NamedTuple

import torch

from ..solver import LM_MODE
from . import compiled, eager, graph, torchsde

ENGINES = {"eager": eager.ENGINE, "graph": graph.ENGINE, "compile": compiled.ENGINE, "torchsde": torchsde.ENGINE}
CHOICES = ("auto", *ENGINES)  # what purify(engine=...) accepts; 'auto' = graph on CUDA when it can, else eager
PUBLISHED = torchsde.ENGINE  # engine='torchsde': the published attack (gradient='adjoint') in torchsde, the reference


def check_engine(engine):
    if not isinstance(engine, str) or engine not in CHOICES:
        raise ValueError(f"engine: expected one of {CHOICES}, got {engine!r}")


def select(engine: str, x, noise=None, gradient: str = "exact", samples: int = 1, mode: str = "coup",
           rows: bool = False):
    """The engine that runs this call: 'auto' is the graph engine where it can run (CUDA tensors, no
    explicit noise), else eager; 'graph' the same, warning once when it cannot; mode 'likelihood-max'
    runs eagerly (its M optimizer steps are not the SDE loop the graph and compile engines capture).
    The published attack (gradient='adjoint') runs on every engine, coup_fast's solver of it on eager,
    compile and graph; 'torchsde' runs it in torchsde, the reference, and other gradients as 'auto' would
    (torchsde has no solver for them; warned once)."""
    check_engine(engine)
    if mode == LM_MODE:
        if engine in ("graph", "compile", "torchsde"):
            ENGINES["graph"].warn_once(f"coup_fast: engine={engine!r} runs the eager engine for mode {LM_MODE!r}")
        return ENGINES["eager"]
    if engine == "torchsde":
        if gradient == "adjoint":
            return PUBLISHED
        ENGINES["graph"].warn_once(f"coup_fast: engine='torchsde' runs the published attack (gradient='adjoint') "
                                   f"only; gradient={gradient!r} runs as engine='auto'")
        engine = "auto"
    if engine in ("auto", "graph"):
        reason = ("rows= (a captured graph draws for its own batch)" if rows else
                  ENGINES["graph"].unsupported(x, noise, gradient, samples))
        if reason is None:
            return ENGINES["graph"]
        if engine == "graph":
            ENGINES["graph"].warn_once(f"coup_fast: engine='graph' runs the eager engine instead: {reason}")
        engine = "eager"
    return ENGINES[engine]


# engine='compile' on a CPU (digits models, tests of issue 18 / bench_attacks.py): its first call per model pair
# and batch-shape class compiles for 20-90 s, later calls save about a quarter of the eager call's time.
COMPILE_SECONDS = 60.0
COMPILE_SAVING = 0.25
COMPILE_MIN_CALLS = 300  # without a measured call time: calls per shape from which compiling pays


class EngineChoice(NamedTuple):
    """What `choose_engine` recommends: `engine` for purify / PurifiedClassifier(engine=...), whether its first
    call per shape compiles, and a line for the progress output."""

    engine: str
    compiles: bool
    reason: str


def choose_engine(device, calls_per_shape: int, seconds_per_call: float | None = None, *,
                  compile_seconds: float = COMPILE_SECONDS) -> EngineChoice:
    """The engine an evaluation should run on `device` when each batch shape is called `calls_per_shape`
    times (purifications plus gradients; from torch 2.13 on all batch sizes above 1 share one compilation,
    batch 1 has its own).

    CUDA: 'auto' (the CUDA-graph engine, bitwise eager, faster there than the compiled step).  CPU:
    'compile' when compiling pays, i.e. calls_per_shape x COMPILE_SAVING x seconds_per_call (the eager
    call's measured time, e.g. from --dry-run) exceeds `compile_seconds`, or, with no time given, from
    COMPILE_MIN_CALLS calls on; else 'eager'.  'compile' needs a C++ compiler on a CPU and rounds like
    eager only to round-off (not bitwise); its first call per shape compiles, so say so before it.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return EngineChoice("auto", False, "CUDA graphs: each configuration captured once and replayed")
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        return EngineChoice("eager", False, "no C++ compiler for engine='compile'")
    if seconds_per_call is None:
        pays = calls_per_shape >= COMPILE_MIN_CALLS
        detail = f"{calls_per_shape} calls per shape ({'>=' if pays else '<'} {COMPILE_MIN_CALLS})"
    else:
        saved = calls_per_shape * COMPILE_SAVING * seconds_per_call
        pays = saved > compile_seconds
        detail = (f"{calls_per_shape} calls per shape x {seconds_per_call:.3g} s would save ~{saved:.0f} s against "
                  f"~{compile_seconds:.0f} s of compiling")
    if pays:
        return EngineChoice("compile", True, f"engine='compile': {detail}; compiling each batch shape first "
                                             f"(20-90 s, once per shape)")
    return EngineChoice("eager", False, f"engine='eager': {detail}, too few to pay for compiling")


def clear_caches():
    """Drop every engine's caches: captured CUDA graphs (and their warnings), compiled functions."""
    for engine in ENGINES.values():
        engine.clear()

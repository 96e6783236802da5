"""The engine registry: who runs the solve of `purify` (docs/design.md §6).

An engine has `solve(x, score_model, classifier, config, stream, gradient, memory)` (start state ->
final state, differentiable in x as `gradient` asks; None when it cannot run these models, and the
eager engine runs instead), `unsupported(x, noise, gradient, samples)` (why it cannot run a call, or None) and
`clear()` (drop its caches).  Adding one is a module here and a line in ENGINES.
"""
from __future__ import annotations

from ..solver import LM_MODE
from . import compiled, eager, graph, torchsde

ENGINES = {"eager": eager.ENGINE, "graph": graph.ENGINE, "compile": compiled.ENGINE}
CHOICES = ("auto", *ENGINES)  # what purify(engine=...) accepts; 'auto' = graph on CUDA when it can, else eager
PUBLISHED = torchsde.ENGINE  # gradient='adjoint', the published attack, runs here whatever the engine


def check_engine(engine):
    if not isinstance(engine, str) or engine not in CHOICES:
        raise ValueError(f"engine: expected one of {CHOICES}, got {engine!r}")


def select(engine: str, x, noise=None, gradient: str = "exact", samples: int = 1, mode: str = "coup"):
    """The engine that runs this call: 'auto' is the graph engine where it can run (CUDA tensors, no
    explicit noise), else eager; 'graph' the same, warning once when it cannot; the published attack
    always runs in torchsde, and mode 'likelihood-max' eagerly (its M optimizer steps are not the SDE
    loop the graph and compile engines capture)."""
    check_engine(engine)
    if mode == LM_MODE:
        if engine in ("graph", "compile"):
            ENGINES["graph"].warn_once(f"coup_fast: engine={engine!r} runs the eager engine for mode {LM_MODE!r}")
        return ENGINES["eager"]
    if engine in ("auto", "graph"):
        reason = ENGINES["graph"].unsupported(x, noise, gradient, samples)
        if reason is None:
            return ENGINES["graph"]
        if engine == "graph":
            ENGINES["graph"].warn_once(f"coup_fast: engine='graph' runs the eager engine instead: {reason}")
        engine = "eager"
    return PUBLISHED if gradient == "adjoint" else ENGINES[engine]


def clear_caches():
    """Drop every engine's caches: captured CUDA graphs (and their warnings), compiled functions."""
    for engine in (*ENGINES.values(), PUBLISHED):
        engine.clear()

"""Compiled engine: a step's network calls as torch.compile'd torch.func functions.

On a CPU at small batch the eager engine spends most of its time in the networks, one dispatcher
call per op, and the exact adjoint's Hessian-vector product needs double backward, which
torch.compile cannot compile through autograd (hence precision.py's compile knob stops at lam = 0).
Written with torch.func, the two functions a step needs are plain functions of tensors,

    drift(x, t)  = (s(x, t), grad_x log max_y p(y | (x + 1)/2))      forward step
    vjp(x, a, t) = J_s(x)^T a + lam H(x) a                           lean adjoint step (DESIGN.md)

and inductor compiles each whole (forward, backward and double backward in one graph): pointwise
ops fused into loops, one Python call per step instead of hundreds of dispatches.  The maths is
the eager engine's (`purify.drift_terms`, `purify.adjoint_vjp`), with the pure-torch confidence
(guidance.log_max_softmax) that inductor fuses itself; tests compare it with unrolled autograd.
memory='fast' calls drift with grad enabled and keeps its graph: AOTAutograd then compiles the
drift's backward too (guidance's double backward included), and a step's VJP is that backward.

The first call per (models, lam, shape, dtype) compiles (tens of seconds on a CPU); later calls
reuse it.  Models must be traceable by torch.compile; weights may change in place between calls.
"""
from __future__ import annotations

import torch

from .guidance import log_max_softmax, state_to_image

_CACHE: dict = {}  # (id(score), id(classifier), lam) -> (score, classifier, CompiledNetworks)
_CACHE_SIZE = 8  # the entries keep their models alive, so an id is never reused while cached


class CompiledNetworks:
    """The compiled drift and adjoint-VJP functions of one (score model, classifier, lam)."""

    def __init__(self, score_model, classifier, lam: float):
        self.lam = float(lam)

        def log_confidence(x):
            return log_max_softmax(classifier(state_to_image(x))).sum()

        guidance = torch.func.grad(log_confidence)

        def drift(x, t):
            score = score_model(x, t)
            return (score, guidance(x)) if self.lam > 0 else (score, None)

        def score_dot(x, t, a):
            return (score_model(x, t) * a).sum()

        def drift_dot(x, t, a):
            return score_dot(x, t, a) + self.lam * (guidance(x) * a).sum()

        self.drift = torch.compile(drift)
        self.vjp_score = torch.compile(torch.func.grad(score_dot))
        self.vjp_hessian = torch.compile(torch.func.grad(drift_dot)) if self.lam > 0 else self.vjp_score

    def drift_terms(self, x, t):
        with torch.no_grad():
            return self.drift(x, t)

    def vjp(self, x, a, t, with_hessian: bool):
        with torch.no_grad():
            return (self.vjp_hessian if with_hessian else self.vjp_score)(x.detach(), t, a)


def compiled_networks(score_model, classifier, lam: float) -> CompiledNetworks:
    """The cached CompiledNetworks of these two models (built on first use)."""
    key = (id(score_model), id(classifier), float(lam))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is score_model and hit[1] is classifier:
        return hit[2]
    nets = CompiledNetworks(score_model, classifier, lam)
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (score_model, classifier, nets)
    return nets


def clear_cache():
    """Forget every compiled function (torch.compile's own caches are torch._dynamo.reset())."""
    _CACHE.clear()

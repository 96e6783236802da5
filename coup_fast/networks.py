"""The networks' part of a step: the drift terms and the adjoint's vector-Jacobian product.

A step needs two things of the score model and the classifier (docs/design.md §2, §3):

    drift_terms(x, t, lam)          -> (s(x, t), g(x) or None)      g = grad_x log max_y p(y | (x + 1)/2)
    vjp(x_k, a, t, lam, hessian)    -> J_s(x_k)^T a (+ lam H(x_k) a) the gradient of the VJP objective

`Networks` declares them; `EagerNetworks` runs them with autograd, and engines.compiled's
`CompiledNetworks` runs the same maths compiled.  `vjp_objective` is the one place the objective
<s, a> + lam <g, a> is written.
"""
from __future__ import annotations

from typing import Protocol

import torch

from . import ops
from .guidance import confidence_grad


def batch_time(x, t: float):
    """t as the (B,) tensor a score model takes: every image of a step shares one time."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def drift_terms(x, t: float, score_model, classifier, lam: float, *, create_graph=False):
    """Score s(x, t) and guidance g = grad_x log max_y p(y|x) (None when lam = 0)."""
    score = score_model(x, batch_time(x, t))
    guidance = confidence_grad(classifier, x, create_graph=create_graph, log_confidence=ops.log_confidence) if lam > 0 else None
    return score, guidance


def vjp_objective(score, guidance, a, lam, with_hessian: bool):
    """<s, a> + lam <g, a>: its gradient in x_k is J_s^T a + lam H a (docs/design.md §3).

    guidance None, or with_hessian False (the detached-guidance gradient), leaves out the lam H term.
    """
    objective = (score * a).sum()
    if guidance is not None and with_hessian:
        objective = objective + lam * (guidance * a).sum()
    return objective


def adjoint_vjp(x_k, a, t: float, score_model, classifier, lam: float, with_hessian: bool):
    """J_s(x_k)^T a + lam H(x_k) a, recomputing one step's network graph (docs/design.md §3)."""
    with torch.enable_grad():
        x_k = x_k.detach().requires_grad_(True)
        score = score_model(x_k, batch_time(x_k, t))
        guidance = None
        if lam > 0 and with_hessian:
            guidance = confidence_grad(classifier, x_k, create_graph=True, log_confidence=ops.log_confidence)
        (vjp,) = torch.autograd.grad(vjp_objective(score, guidance, a, lam, with_hessian), x_k)
    return vjp


class Networks(Protocol):
    """What the solver and the adjoint call of the two networks (eager or compiled)."""

    def drift_terms(self, x, t: float, lam: float, create_graph: bool = False):
        """(score, guidance or None when lam = 0) at states x, time t."""

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        """J_s(x_k)^T a (+ lam H(x_k) a when with_hessian)."""


class EagerNetworks:
    """A step's network calls, run eagerly with autograd (the default `Networks`)."""

    def __init__(self, score_model, classifier):
        self.score_model, self.classifier = score_model, classifier

    def drift_terms(self, x, t: float, lam: float, create_graph=False):
        return drift_terms(x, t, self.score_model, self.classifier, lam, create_graph=create_graph)

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        return adjoint_vjp(x_k, a, t, self.score_model, self.classifier, lam, with_hessian)

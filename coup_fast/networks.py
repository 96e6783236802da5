"""The networks' part of a step: the drift terms and the adjoint's vector-Jacobian product.

A step needs these of the score model and the classifier (docs/design.md §2, §3, §7):

    drift_terms(x, t, lam)            -> (s(x, t), g(x) or None)      g = grad_x log max_y p(y | (x + 1)/2)
    vjp(x_k, a, t, lam, hessian)      -> J_s(x_k)^T a (+ lam H(x_k) a) the gradient of the VJP objective
    drift_and_score_vjp(x, a, t, lam) -> (s, g or None, J_s(x)^T a)   a step of the published attack's adjoint

`Networks` declares them; `EagerNetworks` runs them with autograd, and engines.compiled's
`CompiledNetworks` runs the same maths compiled.  `vjp_objective` is the one place the objective
<s, a> + lam <g, a> is written (the compiled engine differentiates it); `vjp_from_graph` takes its
gradient through graphs already built (the eager adjoint).
"""
from __future__ import annotations

from typing import Protocol

import torch

from . import ops
from .guidance import classifier_logits, confidence_grad


def batch_time(x, t: float):
    """t as the (B,) tensor a score model takes: every image of a step shares one time."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def drift_terms(x, t: float, score_model, classifier, lam: float, *, create_graph=False):
    """Score s(x, t) and guidance g = grad_x log max_y p(y|x) (None when lam = 0)."""
    score = score_model(x, batch_time(x, t))
    guidance = confidence_grad(classifier, x, create_graph=create_graph, log_confidence=ops.log_confidence) if lam > 0 else None
    return score, guidance


def kept_drift_terms(x, t: float, score_model, classifier, lam: float, with_hessian: bool):
    """A step's drift terms at a leaf x (grad enabled) with the graph its adjoint step differentiates kept:
    (score with its graph, the guidance the step uses, the guidance with its graph or None).

    The step's guidance is the plain backward's, bitwise what `drift_terms` gives: a backward with
    create_graph=True runs some activations' differentiable formulas instead of their fused backward
    kernels (SiLU's, for one), which round differently.  So the graph for lam H a comes from a second
    backward of the same classifier forward, and a kept step drifts exactly as a recomputed one
    (memory='lean'): one classifier backward more per kept step, none of its forward.
    """
    score = score_model(x, batch_time(x, t))
    if not lam > 0:
        return score, None, None
    if not with_hessian:
        return score, confidence_grad(classifier, x, log_confidence=ops.log_confidence), None
    logits = classifier_logits(classifier, x)
    if not logits.requires_grad:  # confidence_grad's check, same words
        raise ValueError("classifier: its logits do not depend on its input through autograd (a detached output, "
                         "or torch.no_grad / inference_mode inside it), so the guidance has no gradient")
    objective = ops.log_confidence(logits).sum()
    (value,) = torch.autograd.grad(objective, x, retain_graph=True)
    (graph,) = torch.autograd.grad(objective, x, create_graph=True)
    return score, value, graph


def vjp_objective(score, guidance, a, lam, with_hessian: bool):
    """<s, a> + lam <g, a>: its gradient in x_k is J_s^T a + lam H a (docs/design.md §3).

    guidance None, or with_hessian False (the detached-guidance gradient), leaves out the lam H term.
    """
    objective = (score * a).sum()
    if guidance is not None and with_hessian:
        objective = objective + lam * (guidance * a).sum()
    return objective


def vjp_from_graph(score, guidance, x, a, lam: float):
    """The gradient in x of the VJP objective <s, a> + lam <g, a> through graphs already built, without
    building the objective: autograd.grad of (s, g) with the upstreams (a, lam a) that the objective's
    backward would form (bitwise the same: 1 * a and lam * a are exact products, and x sums the same
    two contributions).  guidance None leaves out the lam H term.  Outputs that do not depend on x
    (a constant score) contribute zero."""
    pairs = [(score, a)]
    if guidance is not None and lam != 0:
        pairs.append((guidance, a * lam))
    pairs = [(out, up) for out, up in pairs if out.requires_grad]
    if not pairs:
        return torch.zeros_like(x)
    outs, ups = zip(*pairs)
    (vjp,) = torch.autograd.grad(outs, x, ups, allow_unused=True)
    return torch.zeros_like(x) if vjp is None else vjp


def adjoint_vjp(x_k, a, t: float, score_model, classifier, lam: float, with_hessian: bool):
    """J_s(x_k)^T a + lam H(x_k) a, recomputing one step's network graph (docs/design.md §3)."""
    with torch.enable_grad():
        x_k = x_k.detach().requires_grad_(True)
        score = score_model(x_k, batch_time(x_k, t))
        guidance = None
        if lam > 0 and with_hessian:
            guidance = confidence_grad(classifier, x_k, create_graph=True, log_confidence=ops.log_confidence)
        return vjp_from_graph(score, guidance, x_k, a, lam)


def drift_and_score_vjp(x, a, t: float, score_model, classifier, lam: float):
    """(s(x, t), g(x) or None, J_s(x)^T a) from one score forward: what a step of torchsde's continuous adjoint
    needs at the reconstructed state (coup_fast.published): the drift to step the path back, the score's VJP
    to step the adjoint (the guidance is detached, as in the published code: no lam H a)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        score = score_model(leaf, batch_time(leaf, t))
        vjp = vjp_from_graph(score, None, leaf, a, lam)
    guidance = confidence_grad(classifier, x, log_confidence=ops.log_confidence) if lam > 0 else None
    return score.detach(), guidance, vjp


class Networks(Protocol):
    """What the solver and the adjoint call of the two networks (eager or compiled)."""

    def drift_terms(self, x, t: float, lam: float, create_graph: bool = False):
        """(score, guidance or None when lam = 0) at states x, time t."""

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        """J_s(x_k)^T a (+ lam H(x_k) a when with_hessian)."""

    def kept_drift_terms(self, x, t: float, lam: float, with_hessian: bool):
        """(score, the step's guidance or None, the guidance with its graph or None) at a leaf x, grad
        enabled: the graphs a kept step differentiates (see `kept_drift_terms`)."""

    def drift_and_score_vjp(self, x, a, t: float, lam: float):
        """(score, guidance or None, J_s(x)^T a) at states x, time t (see `drift_and_score_vjp`)."""


class EagerNetworks:
    """A step's network calls, run eagerly with autograd (the default `Networks`)."""

    def __init__(self, score_model, classifier):
        self.score_model, self.classifier = score_model, classifier

    def drift_terms(self, x, t: float, lam: float, create_graph=False):
        return drift_terms(x, t, self.score_model, self.classifier, lam, create_graph=create_graph)

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        return adjoint_vjp(x_k, a, t, self.score_model, self.classifier, lam, with_hessian)

    def kept_drift_terms(self, x, t: float, lam: float, with_hessian: bool):
        return kept_drift_terms(x, t, self.score_model, self.classifier, lam, with_hessian)

    def drift_and_score_vjp(self, x, a, t: float, lam: float):
        return drift_and_score_vjp(x, a, t, self.score_model, self.classifier, lam)

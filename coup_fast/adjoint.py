"""The exact gradient: the discrete adjoint of the solve (docs/design.md §3).

    a_k = a_{k+1} + beta_k h (a_{k+1}/2 + J_s^T a_{k+1} + lam H a_{k+1}),   k = N-1 .. 0

`adjoint_solve` walks it over a step-VJP strategy: `Recompute` (memory='lean': the stored states
x_0 .. x_{N-1}, one step's network graph recomputed at a time) or `KeptGraphs` (memory='fast': every
step's graph kept from the forward).  `ExactSolve` is the autograd Function that runs the solve
forward and this adjoint backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .networks import vjp_objective
from .solver import PurifyConfig, plain_drift, recording_drift, solve


@dataclass
class KeptStep:
    """One step's network graph, kept from the forward so the adjoint needs no recompute."""

    x: torch.Tensor  # the leaf x_k
    score: torch.Tensor
    guidance: torch.Tensor | None
    used: bool = False  # the graph is freed by its one backward; a second backward recomputes

    @classmethod
    def record(cls, x, t, nets, lam, with_hessian):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            score, guidance = nets.drift_terms(leaf, t, lam, create_graph=with_hessian)
        return cls(leaf, score, guidance)

    def drift_terms(self):
        return self.score.detach(), None if self.guidance is None else self.guidance.detach()

    def vjp(self, a, lam, with_hessian):
        with torch.enable_grad():  # backward passes run under no_grad
            (vjp,) = torch.autograd.grad(vjp_objective(self.score, self.guidance, a, lam, with_hessian), self.x)
        self.used = True
        return vjp


def kept_drift(nets, lam: float, with_hessian: bool, kept: list):
    """A solve drift that records each step's network graph in `kept` (memory='fast')."""
    def drift(k, t, x):
        step = KeptStep.record(x, t, nets, lam, with_hessian)
        kept.append(step)
        return step.drift_terms()
    return drift


class Recompute:
    """Step VJPs from the stored states x_k, recomputing one step's graph at a time (memory='lean')."""

    def __init__(self, states, nets, config: PurifyConfig, with_hessian: bool):
        self.states, self.nets, self.config, self.with_hessian = states, nets, config, with_hessian

    def vjp(self, k: int, a):
        return self.nets.vjp(self.states[k], a, self.config.grid.t(k), self.config.lam, self.with_hessian)


class KeptGraphs:
    """Step VJPs through the graphs kept by the forward (memory='fast'); a graph already used by an
    earlier backward (retain_graph=True) is recomputed."""

    def __init__(self, kept: list, nets, config: PurifyConfig, with_hessian: bool):
        self.kept, self.nets, self.config, self.with_hessian = kept, nets, config, with_hessian

    def vjp(self, k: int, a):
        step = self.kept[k]
        if not step.used:
            return step.vjp(a, self.config.lam, self.with_hessian)
        return self.nets.vjp(step.x, a, self.config.grid.t(k), self.config.lam, self.with_hessian)


def adjoint_solve(step_vjps, a, config: PurifyConfig, first_steps: int | None = None):
    """The discrete adjoint: from a = dL/dx_N walk k = N-1 .. 0 with `step_vjps.vjp(k, a)`; returns
    dL/dx_0 (or the adjoint after the first `first_steps` backward steps, for a CUDA-graph warm-up)."""
    grid = config.grid
    for k in list(reversed(range(grid.n_steps)))[:first_steps]:
        vjp = step_vjps.vjp(k, a)
        a = ops.adjoint_update(a, vjp.to(a.dtype), grid.beta_dt(k))
    return a


class ExactSolve(torch.autograd.Function):
    """Forward: the solve.  Backward: the discrete adjoint, walking k = N-1 .. 0.

    memory='lean' keeps only x_0 .. x_{N-1} (saved for backward) and recomputes one step's graph at a
    time; memory='fast' keeps every step's graph from the forward (N steps of activations, no
    recompute).  with_hessian=False is the detached-guidance gradient.
    """

    @staticmethod
    def forward(ctx, x, nets, config, stream, with_hessian, memory):
        record = []
        drift = kept_drift(nets, config.lam, with_hessian, record) if memory == "fast" else \
            recording_drift(nets, config.lam, record)
        with torch.no_grad():
            out = solve(x, config, stream, drift)
        if memory == "fast":
            ctx.kept = record
        else:
            ctx.save_for_backward(*record)
        ctx.nets, ctx.config, ctx.with_hessian = nets, config, with_hessian
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if hasattr(ctx, "kept"):
            step_vjps = KeptGraphs(ctx.kept, ctx.nets, ctx.config, ctx.with_hessian)
        else:  # unpack once: each access of saved_tensors unpacks (and version-checks) all N
            step_vjps = Recompute(ctx.saved_tensors, ctx.nets, ctx.config, ctx.with_hessian)
        return adjoint_solve(step_vjps, grad_out.contiguous(), ctx.config), None, None, None, None, None


def exact_solve(x, nets, config: PurifyConfig, stream, with_hessian: bool = True, memory: str = "lean"):
    """x_N of the solve from state x, differentiable in x by the discrete adjoint (a plain no-grad solve
    when no gradient is needed)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            return solve(x, config, stream, plain_drift(nets, config.lam))
    return ExactSolve.apply(x, nets, config, stream, with_hessian, memory)

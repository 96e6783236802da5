"""engine='eager': the solve as a Python loop of eager network calls; the exact gradient by the
discrete adjoint (adjoint.ExactSolve), the published attack (gradient='adjoint') by torchsde's continuous
adjoint replayed on coup_fast's solver (coup_fast.published).  The reference every other engine is held to.
It also runs mode 'likelihood-max' (coup_fast.lm: M optimizer steps, their own adjoint), which the other
engines do not.
"""
from __future__ import annotations

import torch

from ..adjoint import exact_solve
from ..lm import lm_solve
from ..networks import EagerNetworks
from ..published import published_solve, stream_path
from ..solver import LM_MODE


class EagerEngine:
    name = "eager"
    takes_states = True  # solve(states=...): intermediate states as differentiable outputs

    def unsupported(self, x, noise=None, gradient="exact", samples=1) -> str | None:
        return None

    def solve(self, x, score_model, classifier, config, stream, gradient="exact", memory="lean", states=()):
        """x_N from start state x, differentiable in x by the discrete adjoint (lam H included for
        gradient='exact', left out for 'detached-guidance'), or for gradient='adjoint' the published
        attack's x at t = 1e-5 and its continuous adjoint; with `states`, (x_N, those states x_k)
        (adjoint.exact_solve; the SDE modes only)."""
        if config.mode == LM_MODE:  # each sample draws its (t, eps) from its own seed, as separate calls would
            grad = "exact" if gradient == "bpda" else gradient  # (the pipeline runs BPDA's forward without grad)
            parts = [lm_solve(part, score_model, classifier, config.lm, seed=seed, gradient=grad, rows=stream.rows)
                     for part, seed in zip(x.chunk(len(stream.seeds)), stream.seeds)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        nets = EagerNetworks(score_model, classifier)
        if gradient == "adjoint":
            return published_solve(x, nets, config, stream_path(stream, config))
        return exact_solve(x, nets, config, stream, gradient == "exact", memory, states)

    def clear(self):
        pass


ENGINE = EagerEngine()

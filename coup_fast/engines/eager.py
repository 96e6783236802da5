"""engine='eager': the solve as a Python loop of eager network calls; the exact gradient by the
discrete adjoint (adjoint.ExactSolve).  The reference every other engine is held to.  It also runs
mode 'likelihood-max' (coup_fast.lm: M optimizer steps, their own adjoint), which the other engines do not.
"""
from __future__ import annotations

import torch

from ..adjoint import exact_solve
from ..lm import lm_solve
from ..networks import EagerNetworks
from ..solver import LM_MODE


class EagerEngine:
    name = "eager"
    takes_states = True  # solve(states=...): intermediate states as differentiable outputs

    def unsupported(self, x, noise=None, gradient="exact", samples=1) -> str | None:
        return None

    def solve(self, x, score_model, classifier, config, stream, gradient="exact", memory="lean", states=()):
        """x_N from start state x, differentiable in x by the discrete adjoint (lam H included for
        gradient='exact', left out for 'detached-guidance'); with `states`, (x_N, those states x_k)
        (adjoint.exact_solve; the SDE modes only)."""
        if config.mode == LM_MODE:  # each sample draws its (t, eps) from its own seed, as separate calls would
            grad = "exact" if gradient == "bpda" else gradient  # (the pipeline runs BPDA's forward without grad)
            parts = [lm_solve(part, score_model, classifier, config.lm, seed=seed, gradient=grad)
                     for part, seed in zip(x.chunk(len(stream.seeds)), stream.seeds)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return exact_solve(x, EagerNetworks(score_model, classifier), config, stream, gradient == "exact", memory,
                           states)

    def clear(self):
        pass


ENGINE = EagerEngine()

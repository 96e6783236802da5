"""engine='eager': the solve as a Python loop of eager network calls; the exact gradient by the
discrete adjoint (adjoint.ExactSolve).  The reference every other engine is held to."""
from __future__ import annotations

from ..adjoint import exact_solve
from ..networks import EagerNetworks


class EagerEngine:
    name = "eager"

    def unsupported(self, x, noise=None, gradient="exact") -> str | None:
        return None

    def solve(self, x, score_model, classifier, config, stream, gradient="exact", memory="lean"):
        """x_N from start state x, differentiable in x by the discrete adjoint (lam H included for
        gradient='exact', left out for 'detached-guidance')."""
        return exact_solve(x, EagerNetworks(score_model, classifier), config, stream, gradient == "exact", memory)

    def clear(self):
        pass


ENGINE = EagerEngine()

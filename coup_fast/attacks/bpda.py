"""BPDA+EOT (Athalye et al., ICML 2018; COUP paper Table 3): PGD whose backward pass treats the purifier as the
identity (purify's gradient='bpda'), gradients averaged over EOT draws; candidates as PGD-EOT's."""
from __future__ import annotations

from . import pgd
from .common import AttackSettings, with_gradient

PAPER_BPDA_STEP = 0.007 / (8 / 255)  # the paper's PGD-20 step, 0.007 at L-inf 8/255 (Sec. 5.2.2), relative to eps


def bpda_step(eps: float, step: float | None = None) -> float:
    """BPDA's step: the paper's 0.007 at eps = 8/255, scaled with eps (a fixed 0.007 could not reach the boundary
    of a larger ball, e.g. L2 eps 0.5, in 20 steps); or `step` when given."""
    return PAPER_BPDA_STEP * eps if step is None else step


def bpda_eot_candidates(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, chunk=None,
                        loss="ce", draws=None) -> dict:
    """BPDA+EOT: PGD-EOT (pgd.pgd_eot_candidates) on the model with the straight-through gradient."""
    return pgd.pgd_eot_candidates(with_gradient(model, "bpda"), x, y, norm=norm, eps=eps, step=bpda_step(eps, step),
                                  n_iter=n_iter, eot=eot, chunk=chunk, loss=loss, draws=draws)


def bpda_eot(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, chunk=None, loss="ce"):
    """BPDA+EOT's last iterate (bpda_eot_candidates' 'final')."""
    return bpda_eot_candidates(model, x, y, norm=norm, eps=eps, step=step, n_iter=n_iter, eot=eot, chunk=chunk,
                               loss=loss)["final"]


def run(model, x, y, *, norm, eps, seed, settings: AttackSettings, draws=None) -> dict:
    """The registry's entry: bpda-eot with settings' budget."""
    s = settings
    return bpda_eot_candidates(model, x, y, norm=norm, eps=eps, step=s.bpda_step, n_iter=s.bpda_iter, eot=s.bpda_eot,
                               chunk=s.eot_chunk, loss=s.loss, draws=draws)

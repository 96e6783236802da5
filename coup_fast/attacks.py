"""Attacks on purified classifiers: AutoAttack (pyautoattack, unpatched), APGD-CE, PGD+EOT, BPDA+EOT.

A model is any callable from [0, 1] images (B, C, H, W) to logits (B, K) (AutoAttack /
RobustBench convention).  Every attack returns adversarial images in [0, 1] inside the
eps-ball of the threat model.  Randomness (random starts, purification noise) comes from
torch's global RNG, so `torch.manual_seed` before a call reproduces it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .purify import PurifiedClassifier

NORMS = ("Linf", "L2")
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}  # the paper's CIFAR-10 threat models (Tables 1-3)
# Attack names.  'aa' is the paper's protocol: a sample is robust only if it survives both
# AutoAttack versions, 'aa-standard' (APGD-CE, APGD-T, FAB-T, Square) and 'aa-rand'
# (APGD-CE, APGD-DLR with EOT).
ATTACKS = ("apgd-ce", "aa", "aa-standard", "aa-rand", "pgd-eot", "bpda-eot")
AA_VERSIONS = {"aa": ("standard", "rand"), "aa-standard": ("standard",), "aa-rand": ("rand",)}


@dataclass(frozen=True)
class AttackSettings:
    """Iteration budgets; the defaults are the paper's / AutoAttack's."""

    n_iter: int = 100            # APGD iterations (apgd-ce and inside AutoAttack)
    eot: int = 20                # EOT samples of AutoAttack 'rand' (APGD-CE, APGD-DLR)
    n_restarts: int = 1          # APGD restarts
    fab_iter: int = 100          # FAB-T iterations (aa-standard)
    square_queries: int = 5000   # Square queries (aa-standard)
    n_target_classes: int = 9    # APGD-T / FAB-T target classes (aa-standard)
    pgd_iter: int = 20           # pgd-eot iterations
    pgd_step: float | None = None  # pgd-eot step; None: 2.5 eps / pgd_iter (Madry et al.)
    pgd_eot: int = 20            # pgd-eot EOT samples per gradient
    bpda_iter: int = 20          # bpda-eot: PGD-20 (paper, Table 3)
    bpda_step: float | None = None  # bpda-eot step; None: 0.007 eps / (8/255), the paper's 0.007 at 8/255
    bpda_eot: int = 20           # bpda-eot EOT samples per gradient


def with_gradient(model, gradient: str):
    """The same defense with the attacker's backward pass switched (purify's `gradient=`).

    Models that are not a PurifiedClassifier have one gradient only and come back unchanged.
    """
    if isinstance(model, PurifiedClassifier):
        return PurifiedClassifier(model.score_model, model.classifier, **{**model.purify_kwargs, "gradient": gradient})
    return model


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations (B, ...) onto the L-inf or L2 ball of radius eps."""
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / flat).clamp(max=1.0).view(-1, *[1] * (delta.ndim - 1))


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))


def _random_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "Linf":
        return (torch.rand_like(x) * 2 - 1) * eps
    d = torch.randn_like(x)
    r = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view(-1, *[1] * (x.ndim - 1))
    return _ascent(d, "L2") * eps * r


def eot_grad(model, x: torch.Tensor, y: torch.Tensor, eot: int) -> torch.Tensor:
    """Expectation over Transformation: the cross-entropy input gradient averaged over
    `eot` independent calls of a stochastic model (each draws fresh purification noise)."""
    grad = torch.zeros_like(x)
    for _ in range(eot):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xr), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, xr)
        grad += g
    return grad / eot


def pgd_eot(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, random_start=True):
    """PGD (Madry et al. 2018) with EOT gradients (Athalye et al. 2018) under L-inf or L2.

    x: (B, C, H, W) in [0, 1], y: (B,) int64.  step None: 2.5 eps / n_iter.  Returns the
    last iterate x + delta, ||delta|| <= eps, clamped to [0, 1].
    """
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    step = 2.5 * eps / n_iter if step is None else step
    x = x.detach()
    delta = _random_start(x, norm, eps) if random_start else torch.zeros_like(x)
    delta = (x + project(delta, norm, eps)).clamp(0, 1) - x
    for _ in range(n_iter):
        g = eot_grad(model, x + delta, y, eot)
        delta = project(delta + step * _ascent(g, norm), norm, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def bpda_eot(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20):
    """BPDA+EOT (Athalye et al. 2018; paper Table 3): PGD whose backward pass treats the
    purifier as the identity (purify's gradient='bpda'), gradients averaged over EOT draws.

    step None: the paper's 0.007 at eps = 8/255, scaled with eps (a fixed 0.007 could not reach
    the boundary of a larger ball, e.g. L2 eps 0.5, in 20 steps)."""
    step = 0.007 * eps / (8 / 255) if step is None else step
    return pgd_eot(with_gradient(model, "bpda"), x, y, norm=norm, eps=eps, step=step, n_iter=n_iter, eot=eot)


def _quiet_autoattack_logs():
    # pyautoattack warns on every randomized defense under 'standard' (expected: the paper runs
    # both versions on purpose) and logs per-attack progress; we report our own summary.
    logging.getLogger("auto-attack").setLevel(logging.ERROR)


def _set_apgd_iterations(apgd, n_iter: int):
    # APGD derives its step-size schedule (first checkpoint, minimum spacing, decrement) from
    # n_iter when it is built (Croce & Hein 2020: 22 %, 6 %, 3 % of the iterations); AutoAttack
    # builds it with n_iter = 100, so changing n_iter alone would keep the 100-iteration schedule.
    apgd.n_iter = n_iter
    apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def build_autoattack(model, *, version="rand", norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(),
                     device=None):
    """pyautoattack's AutoAttack (unpatched) for one version, budgets from settings."""
    from pyautoattack import AutoAttack

    _quiet_autoattack_logs()
    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)
    _set_apgd_iterations(adversary.apgd, settings.n_iter)
    adversary.apgd.n_restarts = settings.n_restarts
    if version == "rand":
        adversary.apgd.eot_iter = settings.eot
    else:
        _set_apgd_iterations(adversary.apgd_targeted, settings.n_iter)
        adversary.apgd_targeted.n_target_classes = settings.n_target_classes
        adversary.fab.n_iter = settings.fab_iter
        adversary.fab.n_target_classes = settings.n_target_classes
        adversary.square.n_queries = settings.square_queries
    return adversary


def autoattack(model, x, y, *, version="rand", norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings()):
    """One AutoAttack version through the unpatched pyautoattack package, budgets from settings."""
    adversary = build_autoattack(model, version=version, norm=norm, eps=eps, seed=seed, settings=settings,
                                 device=x.device)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return x_adv


def apgd_ce(model, x, y, *, norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(), eot=1):
    """APGD on the cross-entropy loss (Croce & Hein 2020), pyautoattack's APGDAttack; `eot` draws
    per gradient (1: none, the 'apgd-ce' attack)."""
    from pyautoattack.autopgd_base import APGDAttack

    _quiet_autoattack_logs()
    attack = APGDAttack(model, n_restarts=settings.n_restarts, n_iter=settings.n_iter, eps=eps, norm=norm,
                        loss="ce", eot_iter=eot, rho=0.75, seed=seed, device=x.device)
    return attack.perturb(x, y)


def run_attack(name, model, x, y, *, norm="Linf", eps=None, seed=0, settings=AttackSettings()):
    """Run attack `name` (one of ATTACKS) and return a list of adversarial batches.

    The list has one entry per attack version whose verdicts must all hold: two for 'aa'
    (standard and rand; the paper counts a sample robust only if robust under both).
    """
    if name not in ATTACKS:
        raise ValueError(f"attack: expected one of {ATTACKS}, got {name!r}")
    if norm not in NORMS:
        raise ValueError(f"threat: expected one of {NORMS}, got {norm!r}")
    eps = DEFAULT_EPS[norm] if eps is None else eps
    if name in AA_VERSIONS:
        return [autoattack(model, x, y, version=v, norm=norm, eps=eps, seed=seed, settings=settings)
                for v in AA_VERSIONS[name]]
    if name == "apgd-ce":
        return [apgd_ce(model, x, y, norm=norm, eps=eps, seed=seed, settings=settings)]
    if name == "pgd-eot":
        return [pgd_eot(model, x, y, norm=norm, eps=eps, step=settings.pgd_step, n_iter=settings.pgd_iter,
                        eot=settings.pgd_eot)]
    return [bpda_eot(model, x, y, norm=norm, eps=eps, step=settings.bpda_step, n_iter=settings.bpda_iter,
                     eot=settings.bpda_eot)]

"""APGD-CE (Croce & Hein, ICML 2020) through pyautoattack's APGDAttack, unpatched; EOT draws served batched.

Candidates per restart: 'adv' (APGD's x_best_adv: the last iterate that fooled one purification, else its start) and
'max-loss' (x_best, the iterate of highest loss).  It runs on every image: pyautoattack's perturb() drops the images
one purification misclassified and returns the clean image for those no single purification was fooled by.
"""
from __future__ import annotations

import logging

import torch

from .common import AttackSettings, BatchedEOT, ImageDraws, eot_model, rand_like, randn_like


def quiet_autoattack_logs():
    # pyautoattack warns on every randomized defense under 'standard' (expected: the paper runs
    # both versions on purpose) and logs per-attack progress; we report our own summary.
    logging.getLogger("auto-attack").setLevel(logging.ERROR)


def set_apgd_iterations(apgd, n_iter: int):
    # APGD derives its step-size schedule (first checkpoint, minimum spacing, decrement) from
    # n_iter when it is built (Croce & Hein 2020: 22 %, 6 %, 3 % of the iterations); AutoAttack
    # builds it with n_iter = 100, so changing n_iter alone would keep the 100-iteration schedule.
    apgd.n_iter = n_iter
    apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def _apgd(model, x, *, norm, eps, seed, settings, eot, loss="ce"):
    from pyautoattack.autopgd_base import APGDAttack

    quiet_autoattack_logs()
    return APGDAttack(eot_model(model, eot, settings.eot_chunk), n_restarts=settings.n_restarts,
                      n_iter=settings.n_iter, eps=eps, norm=norm, loss=loss, eot_iter=eot, rho=0.75, seed=seed,
                      device=x.device)


def apgd_ce(model, x, y, *, norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(), eot=1):
    """APGD on the cross-entropy loss (Croce & Hein 2020), pyautoattack's APGDAttack.perturb; `eot` draws per
    gradient (1: none), served batched (BatchedEOT)."""
    attack = _apgd(model, x, norm=norm, eps=eps, seed=seed, settings=settings, eot=eot)
    adv = attack.perturb(x, y)
    if isinstance(attack.model, BatchedEOT):
        attack.model.check_finished()
    return adv


def apgd_ce_candidates(model, x, y, *, norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(), eot=1,
                       draws: ImageDraws | None = None) -> dict:
    """APGD-CE (pyautoattack's APGD iterations, attack_single_run) on every image, each restart's x_best_adv
    ('adv') and x_best ('max-loss') as candidates (module docstring); seeded as APGDAttack.perturb seeds.  draws:
    each restart's random start image by image (ImageDraws), made by APGD's own formula x + eps normalize(t), t
    uniform in [-1, 1] (L-inf) or normal (L2), and handed to attack_single_run as its x_init."""
    attack = _apgd(model, x, norm=norm, eps=eps, seed=seed, settings=settings, eot=eot)
    x, y = x.detach().clone().float(), y.detach().clone().long()
    attack.init_hyperparam(x)
    torch.random.manual_seed(attack.seed)
    if x.is_cuda:
        torch.cuda.random.manual_seed(attack.seed)
    out = {}
    for restart in range(settings.n_restarts):
        x_init = None
        if draws is not None:
            t = rand_like(x, draws) * 2 - 1 if norm == "Linf" else randn_like(x, draws)
            x_init = x + eps * attack.normalize(t)
        x_best, _, _, x_best_adv = attack.attack_single_run(x, y, x_init=x_init)
        tag = "" if settings.n_restarts == 1 else f"-{restart}"
        out[f"adv{tag}"], out[f"max-loss{tag}"] = x_best_adv.detach(), x_best.detach()
    if isinstance(attack.model, BatchedEOT):
        attack.model.check_finished()
    return out


def run(model, x, y, *, norm, eps, seed, settings: AttackSettings, draws=None) -> dict:
    """The registry's entry: apgd-ce with settings' budget."""
    return apgd_ce_candidates(model, x, y, norm=norm, eps=eps, seed=seed, settings=settings, eot=settings.apgd_eot,
                              draws=draws)

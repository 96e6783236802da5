"""PGD with EOT gradients: Madry et al. (ICLR 2018) + Athalye et al. (ICML 2018); BIM (Kurakin et al. 2017) from the
clean image.  Candidates: 'final' (the last iterate) and 'best' (common.BestIterate, from the gradient's own draws)."""
from __future__ import annotations

import torch

from .common import AttackSettings, BestIterate, ImageDraws, _ascent, _random_start, check_norm, eot_loss_grad, \
    mean_draw_loss, project, to_box


def pgd_eot_candidates(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, random_start=True,
                       chunk=None, loss="ce", draws: ImageDraws | None = None) -> dict:
    """PGD (Madry et al. 2018) with EOT gradients (Athalye et al. 2018) under L-inf or L2.

    x: (B, C, H, W) in [0, 1], y: (B,) int64.  step None: 2.5 eps / n_iter; random_start False is BIM
    (Kurakin et al. 2017); loss: the loss ascended (common.LOSSES: 'ce', 'margin', 'dlr').  Returns {'final':
    the last iterate, 'best': per image the iterate whose `eot` draws were classified correctly least often
    (ties: the higher mean loss)}, each x + delta with ||delta|| <= eps, clamped to [0, 1].  The draws that
    estimate 'best' are the gradient's own: no extra cost.  draws: the random start image by image (ImageDraws;
    None: torch's global RNG).
    """
    check_norm(norm)
    step = 2.5 * eps / n_iter if step is None else step
    x = x.detach()
    delta = _random_start(x, norm, eps, draws) if random_start else torch.zeros_like(x)
    delta = to_box(x, project(delta, norm, eps))
    best = BestIterate(x + delta, y)
    for _ in range(n_iter):
        g, logits = eot_loss_grad(model, x + delta, y, eot, chunk, loss)
        best.update(x + delta, (logits.argmax(-1) == y).float().mean(0), mean_draw_loss(logits, y, loss))
        delta = project(delta + step * _ascent(g, norm), norm, eps)
        delta = to_box(x, delta)
    return {"final": (x + delta).detach(), "best": best.x.detach()}


def pgd_eot(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, random_start=True, chunk=None,
            loss="ce"):
    """PGD+EOT's last iterate (pgd_eot_candidates' 'final'): (B, C, H, W) in [0, 1] inside the eps-ball."""
    return pgd_eot_candidates(model, x, y, norm=norm, eps=eps, step=step, n_iter=n_iter, eot=eot,
                              random_start=random_start, chunk=chunk, loss=loss)["final"]


def run(model, x, y, *, norm, eps, seed, settings: AttackSettings, draws=None) -> dict:
    """The registry's entry: pgd-eot with settings' budget."""
    s = settings
    return pgd_eot_candidates(model, x, y, norm=norm, eps=eps, step=s.pgd_step_for(eps), n_iter=s.pgd_iter,
                              eot=s.pgd_eot, random_start=s.pgd_random_start, chunk=s.eot_chunk, loss=s.loss,
                              draws=draws)

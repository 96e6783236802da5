"""DiffAttack (Kang, Song & Li, NeurIPS 2023): APGD on the classification loss plus a deviated-reconstruction loss
over the intermediate states of the purification, differentiated exactly with bounded memory.

    L     = L_cls + lambda L_dev                                       (Sec. 3.4, Eq. 10)
    L_dev = E_t [alpha(t) d(x_t, x'_t)]                                (Sec. 3.2, Eq. 8)

x'_t is the reverse (purification) process's state at time t and x_t the diffusion process's sample at that
time; alpha(t) is the reciprocal of the number of steps carrying the loss (App. D.2), taken uniformly over the
reverse path (Sec. 4.7: uniform steps beat the first or last third).  The defaults are App. D.2's: AutoAttack's
APGD, 100 iterations, EOT 20, momentum 0.75, step 2 eps, lambda = 1, L_cls the cross-entropy in a first round and
the DLR loss in a second (as DiffPure's AutoAttack-rand runs them).  The paper's code was never published
(github.com/kangmintong/DiffAttack holds a README); docs/design.md §10 says what is taken from where.

Here the states are purify's (purify(states=...), docs/design.md §3): x'_k after step k, k = 1 .. N, at time
t_k = t* - k h, and by default every one of them carries L_dev.  The diffusion process's sample at t_k is the
continuous VP marginal of the input u with DiffPure's own forward draw eps (recovered from the solve's start,
x'_0 = a* (2u - 1) + s* eps), x_t = alpha(t_k)(2u - 1) + sigma(t_k) eps; COUP and its unguided ablation start the
reverse process at the input itself, with no forward draw, so there x_t = 2u - 1.  d is the squared distance per
entry, averaged over the image.  Gradients flow through both x'_k (the discrete adjoint adds dL/dx'_k at step k)
and x_t (the input).

On a model without those states (a bare classifier, likelihood maximization, the published adjoint gradient,
whose backward sees the final state only) L_dev is 0 and DiffAttack is APGD-EOT on L_cls.

Candidates per round: '<loss>-best' (per image the iterate whose EOT draws were right least often, ties: the
higher objective) and '<loss>-max-loss' (APGD's x_best).
"""
from __future__ import annotations

import torch

from ..guidance import image_to_state
from ..sde import ReverseGrid, diffusion_marginal, vp_alpha, vp_sigma
from .common import AttackSettings, _chunks, apgd_ascent, attack_loss, check_norm, sample_logits

ROUNDS = ("ce", "dlr")  # App. D.1: the cross-entropy in the first round, the DLR loss in the second
SDE_MODES = ("coup", "reverse", "diffpure")


def dev_steps(n_steps: int, count: int | None = None) -> tuple:
    """The states carrying L_dev: `count` of the N step indices 1 .. N, evenly spaced and ending at N (None or
    count >= N: all of them)."""
    if count is None or count >= n_steps:
        return tuple(range(1, n_steps + 1))
    return tuple(sorted({max(1, round(j * n_steps / count)) for j in range(1, count + 1)}))


def has_states(model) -> bool:
    """Whether the model's purification exposes its intermediate states (purify(states=...)) to its gradient."""
    kwargs = getattr(model, "purify_kwargs", None)
    return (kwargs is not None and callable(getattr(model, "purify", None))
            and kwargs.get("mode", "coup") in SDE_MODES and kwargs.get("gradient", "exact") != "adjoint")


def references(u_state: torch.Tensor, start: torch.Tensor, kwargs: dict, steps: tuple) -> torch.Tensor:
    """The diffusion process's samples x_t at the states' times (len(steps), *u_state.shape) (module docstring).

    u_state: the input 2u - 1 (rows as the states'); start: the solve's start state x'_0."""
    grid = ReverseGrid.from_dt(kwargs.get("t_star", 0.1), kwargs.get("dt", 1e-3))
    if kwargs.get("mode", "coup") != "diffpure":
        return u_state.expand(len(steps), *u_state.shape)
    scale, std = diffusion_marginal(grid.t_star, kwargs.get("diffusion", "ddpm"))
    eps = (start - scale * u_state) / std  # DiffPure's forward draw (a constant: its gradient in u cancels)
    times = [0.0 if k == grid.n_steps else grid.t(k) for k in steps]
    return torch.stack([vp_alpha(t) * u_state + vp_sigma(t) * eps for t in times])


def deviation(states: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """L_dev per row: the mean over the states of the mean squared difference per entry, (S, R, ...) -> (R,)."""
    return ((states - refs) ** 2).flatten(2).mean(-1).mean(0)


def _objective(model, y, loss: str, eot: int, chunk: int | None, lam: float, steps: int | None):
    """APGD's objective: (the EOT mean of L_cls + lambda L_dev, its EOT-mean gradient, the fraction of draws right)."""
    kwargs = getattr(model, "purify_kwargs", {})
    dev = lam > 0 and has_states(model)
    if dev:
        n_steps = ReverseGrid.from_dt(kwargs.get("t_star", 0.1), kwargs.get("dt", 1e-3)).n_steps
        ks = dev_steps(n_steps, steps)

    def objective(x):
        grad, losses, correct = torch.zeros_like(x), [], []
        for size in _chunks(eot, chunk):
            xr = x.detach().requires_grad_(True)
            rows = y.repeat(size)
            with torch.enable_grad():
                if dev:
                    images, states = model.purify(xr, samples=size, states=(0, *ks))
                    logits = model.classifier(images)
                    u_state = image_to_state(xr).repeat(size, *[1] * (x.ndim - 1))
                    per_row = attack_loss(loss, logits, rows) + lam * deviation(
                        states[1:], references(u_state, states[0], kwargs, ks))
                else:
                    logits = sample_logits(model, xr, size)
                    per_row = attack_loss(loss, logits, rows)
                (g,) = torch.autograd.grad(per_row.sum(), xr)
            grad += g
            losses.append(per_row.detach().view(size, -1))
            correct.append((logits.detach().argmax(-1) == rows).view(size, -1))
        return torch.cat(losses).mean(0), grad / eot, torch.cat(correct).float().mean(0)

    return objective


def diffattack_candidates(model, x, y, *, norm="Linf", eps=8 / 255, n_iter=100, eot=20, lam=1.0, steps=None,
                          chunk=None, draws=None) -> dict:
    """DiffAttack (module docstring) under L-inf or L2: x (B, C, H, W) in [0, 1], y (B,).  Per round of ROUNDS, APGD
    (common.apgd_ascent, n_iter iterations) on L_cls + lam L_dev with `eot` draws per gradient (batched, `chunk` per
    purify call); `steps` states carry L_dev (None: all N).  Returns {'<loss>-best', '<loss>-max-loss'} per round."""
    check_norm(norm)
    out = {}
    for loss in ROUNDS:
        found = apgd_ascent(_objective(model, y, loss, eot, chunk, lam, steps), x, y, norm=norm, eps=eps, n_iter=n_iter,
                            draws=draws)
        out[f"{loss}-best"], out[f"{loss}-max-loss"] = found["best"], found["max-loss"]
    return out


def run(model, x, y, *, norm, eps, seed, settings: AttackSettings, draws=None) -> dict:
    """The registry's entry: DiffAttack with settings' budget."""
    s = settings
    return diffattack_candidates(model, x, y, norm=norm, eps=eps, n_iter=s.diffattack_iter, eot=s.diffattack_eot,
                                 lam=s.diffattack_lambda, steps=s.diffattack_steps, chunk=s.eot_chunk, draws=draws)

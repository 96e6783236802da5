"""Reference paths, the test oracles beside the solver: torchsde, the published attack, plain autograd.

The torchsde solvers themselves live in engines/torchsde.py (the published attack is also what
purify(gradient='adjoint') runs); this module wraps them, and the unrolled loop, in the purification
pipeline on images in [0, 1].  It never imports the public API (docs/design.md §4).

- `purify_torchsde` / `solve_torchsde`: the same SDE through torchsde.  With method='euler' on purify's
  grid (t_end = 0) and the Brownian increments of the same path, `sdeint` reproduces `purify` step for
  step.  With adjoint=True, `sdeint_adjoint` solves the continuous adjoint SDE backwards; it needs
  t_end > 0 (epsilon-model scores diverge at t = 0, where the adjoint evaluates the drift first), and
  its uniform grid of N steps from t* to t_end makes the forward and the adjoint visit the same times.
  The guidance stays differentiable, so this adjoint includes the lam H term (docs/design.md).
- `purify_published` / `solve_published`: the attack gradient of the official COUP (and DiffPure) code,
  reproduced: torchsde `sdeint_adjoint`, Euler, fixed dt (1e-3 in the paper), a torchsde
  BrownianInterval, ts = [1 - t*, 1 - 1e-5] (so the path ends at t = 1e-5, its last step 1e-5
  shorter), and the guidance computed on x.detach(): a constant to the adjoint, no lam H term.
  `purify(gradient='adjoint')` runs the same computation on coup_fast's solver (coup_fast.published);
  `purify_published(..., engine='eager' or 'compile')` runs that fast path on this function's noise (a
  BrownianInterval, `bm` or `noise`), queried at the times torchsde queries it: the equality tests' A/B.
- `purify_unrolled`: plain autograd through every step of `purify`'s own loop, the exact-gradient oracle.
"""
from __future__ import annotations

import math

import torch

from .engines import compiled
from .engines.torchsde import (T_END, GridBrownian, ReverseVPSDE, brownian_interval, solve_published,  # noqa: F401
                               solve_torchsde, torchsde_times, uniform_step)
from .networks import EagerNetworks
from .published import GridPath, PublishedGrid, QueriedPath, published_solve
from .sde import ReverseGrid
from .solver import NoiseStream, PurifyConfig, pipeline, solve, unrolled_drift

__all__ = ["PUBLISHED_SOLVERS", "T_END", "GridBrownian", "ReverseVPSDE", "brownian_interval", "noise_from_brownian",
           "purify_published", "purify_torchsde", "purify_unrolled", "solve_published", "solve_torchsde",
           "torchsde_times"]


def noise_from_brownian(bm, x_shape, t_star: float, dt: float = 1e-3) -> torch.Tensor:
    """The (N, *x_shape) `noise` tensor z_k = (W(tau_{k+1}) - W(tau_k)) / sqrt(h) of a Brownian path on
    purify's grid (tau_k = 1 - t* + k h, h = t*/N)."""
    times = torchsde_times(t_star, 0.0, uniform_step(t_star, 0.0, ReverseGrid.from_dt(t_star, dt).n_steps))
    draws = [bm(a, b) / math.sqrt(b - a) for a, b in zip(times[:-1], times[1:])]
    return torch.stack(draws).reshape(len(draws), *x_shape)


def _config(t_star, lam, dt, mode, diffusion) -> PurifyConfig:
    return PurifyConfig(ReverseGrid.from_dt(float(t_star), float(dt)), float(lam) if mode == "coup" else 0.0, mode,
                        diffusion)

class _Given:
    """The draws of a reference call: DiffPure's diffusion draw given explicitly (noise[0]); the steps'
    noise goes to torchsde as a path."""

    def __init__(self, noise):
        self.noise = noise

    def diffusion_eps(self, like):
        return self.noise[0].to(like.dtype)


def _split_noise(noise, bm, mode):
    """(the diffusion draw's holder, the steps' noise) of a reference call's `noise` argument."""
    if mode != "diffpure":
        return None, noise
    return _Given(noise), (noise[1:] if bm is None else None)


def purify_torchsde(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", diffusion="ddpm",
                    noise=None, bm=None, t_end=0.0, adjoint=False, adjoint_params=None):
    """`purify` through torchsde: images in [0, 1] -> purified images in [0, 1] (see `solve_torchsde`).

    For mode='diffpure', `noise` carries the forward-diffusion draw first (as in `purify`);
    with `bm`, pass the diffusion draw as noise of shape (1, *x.shape).
    """
    config = _config(t_star, lam, dt, mode, diffusion)
    draws, step_noise = _split_noise(noise, bm, mode)
    return pipeline(x, config, draws, lambda state: solve_torchsde(
        state, score_model, classifier, config, step_noise, bm=bm, t_end=t_end, adjoint=adjoint,
        adjoint_params=adjoint_params))


PUBLISHED_SOLVERS = ("torchsde", "eager", "compile")  # purify_published's engine: the reference, or the fast path's


def _published_networks(engine: str, score_model, classifier):
    if engine == "eager":
        return EagerNetworks(score_model, classifier)
    if engine == "compile":
        return compiled.ENGINE.networks(score_model, classifier)
    raise ValueError(f"engine: expected one of {PUBLISHED_SOLVERS}, got {engine!r} (the graph engine draws its own "
                     "counter-based noise: purify(gradient='adjoint', engine='graph'))")


def purify_published(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", diffusion="ddpm",
                     noise=None, bm=None, seed: int = 0, adjoint_params=(), engine="torchsde"):
    """The official COUP / DiffPure pipeline on images in [0, 1], differentiable by the published
    attack's adjoint (`solve_published`).  For mode='diffpure', `noise` carries the diffusion draw
    first; with `bm`, pass it as noise of shape (1, *x.shape).

    engine: 'torchsde' (torchsde's sdeint_adjoint, the reference) or 'eager' / 'compile': coup_fast's solver
    of the same computation (coup_fast.published) on the same noise, `bm` (or the BrownianInterval of `seed`)
    queried at the times torchsde queries it, `noise` as the same grid path; adjoint_params is torchsde's only."""
    config = _config(t_star, lam, dt, mode, diffusion)
    draws, step_noise = _split_noise(noise, bm, mode)
    if engine == "torchsde":
        return pipeline(x, config, draws, lambda state: solve_published(
            state, score_model, classifier, config, noise=step_noise, bm=bm, seed=seed, adjoint_params=adjoint_params))
    nets = _published_networks(engine, score_model, classifier)

    def solve_state(state):
        if step_noise is not None:
            path = GridPath(PublishedGrid.of(config.grid).forward, step_noise.to(state.dtype))
        else:
            path = QueriedPath([bm if bm is not None else brownian_interval(state, t_star, seed=seed, t_end=T_END)])
        return published_solve(state, nets, config, path)

    return pipeline(x, config, draws, solve_state)


def purify_unrolled(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", diffusion="ddpm",
                    noise=None, seed=0, gradient="exact"):
    """`purify` with plain autograd through every step (all graphs kept): the gradient reference.

    Pure-torch noise (the Philox recipe of coup_fast.noise for `seed`, purify's counters) when `noise`
    is None.  gradient='detached-guidance' treats the guidance as a constant, as the paper's code does.
    """
    config = _config(t_star, lam, dt, mode, diffusion)
    if noise is None:
        noise = NoiseStream(x, config, seed=seed).as_tensor(x)
    stream = NoiseStream(x, config, noise)
    drift = unrolled_drift(EagerNetworks(score_model, classifier), config.lam, gradient == "detached-guidance")
    return pipeline(x, config, stream, lambda state: solve(state, config, stream, drift))

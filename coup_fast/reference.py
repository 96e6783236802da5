"""Reference paths: the same guided SDE through torchsde, and plain autograd through the loop.

torchsde integrates forward in time, so the reverse-time SDE of Eq. 5 is written in
s = t* - t:  dy = beta(t) (y/2 + s_theta(y, t) + lam grad log max_y p) ds + sqrt(beta(t)) dW_s.
With method='euler' and the Brownian increments of the same path, sdeint reproduces
`purify` step for step; `sdeint_adjoint` solves the continuous adjoint SDE backwards
(what DiffPure and the paper's code use for gradients).
"""
from __future__ import annotations

import math

import torch
import torchsde
from torch import nn
from torchsde._brownian import BaseBrownian  # the interface sdeint expects of `bm`

from .guidance import confidence_grad, image_to_state, state_to_image
from .noise import philox_normal
from .purify import Noise, Setting, solve, validate
from .sde import ReverseGrid, diffuse, vp_beta


T_MIN = 1e-5  # smallest time the torchsde drift is evaluated at


class GuidedReverseSDE(nn.Module):
    """Eq. 5 as a torchsde SDE (Ito, diagonal noise) in the forward variable s = t* - t.

    States are flattened to (B, D) as torchsde requires; `shape` restores them for the networks.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, score_model, classifier, lam: float, t_star: float, shape):
        super().__init__()
        # Registered as submodules when they are modules, so sdeint_adjoint sees their
        # parameters (DiffPure's setting: the score network's weights are adjoint parameters).
        self.score_model, self.classifier = score_model, classifier
        self.lam, self.t_star, self.shape = float(lam), float(t_star), tuple(shape)

    def _t(self, s):
        # The adjoint evaluates the drift at the end point s = t* (t = 0), where sigma(0) = 0 makes
        # epsilon-model scores infinite; the forward Euler solve never goes there (t_k >= h).  Clamp
        # as DiffPure does.
        return max(self.t_star - float(s), T_MIN)

    def f(self, s, y):
        t = self._t(s)
        x = y.reshape(self.shape)
        drift = 0.5 * x + self.score_model(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        if self.lam > 0:
            drift = drift + self.lam * confidence_grad(self.classifier, x, create_graph=y.requires_grad)
        return (vp_beta(t) * drift).reshape(y.shape)

    def g(self, s, y):
        return torch.full_like(y, math.sqrt(vp_beta(self._t(s))))


class GridBrownian(BaseBrownian):
    """A Brownian path given by its increments on the solver grid: W(s_{k+1}) - W(s_k) = sqrt(h) z_k.

    Lets torchsde run on exactly the noise `purify` uses; queries are snapped to the grid.
    """

    def __init__(self, noise: torch.Tensor, h: float):
        super().__init__()
        n = noise.shape[0]
        inc = math.sqrt(h) * noise.reshape(n, noise.shape[1], -1)
        self._cum = torch.cat([torch.zeros_like(inc[:1]), inc.cumsum(0)])  # W at s_0 .. s_N
        self._h = h

    def _w(self, s):
        k = min(max(int(round(float(s) / self._h)), 0), self._cum.shape[0] - 1)
        return self._cum[k]

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        return self._w(tb) - self._w(ta)

    def __repr__(self):
        return f"GridBrownian(steps={self._cum.shape[0] - 1}, h={self._h})"

    @property
    def dtype(self):
        return self._cum.dtype

    @property
    def device(self):
        return self._cum.device

    @property
    def shape(self):
        return self._cum.shape[1:]

    @property
    def levy_area_approximation(self):
        return "none"


def brownian_interval(x: torch.Tensor, t_star: float, *, seed: int = 0) -> torchsde.BrownianInterval:
    """A torchsde BrownianInterval on s in [0, t*] for states shaped like x (flattened per row)."""
    return torchsde.BrownianInterval(t0=0.0, t1=float(t_star), size=(x.shape[0], x[0].numel()), dtype=x.dtype,
                                     device=x.device, entropy=seed)


def noise_from_brownian(bm, x_shape, t_star: float, dt: float = 1e-3) -> torch.Tensor:
    """The (N, *x_shape) `noise` tensor z_k = (W(s_{k+1}) - W(s_k)) / sqrt(h) of a Brownian path."""
    grid = ReverseGrid.from_dt(t_star, dt)
    h = grid.h
    draws = [bm(k * h, (k + 1) * h) / math.sqrt(h) for k in range(grid.n_steps)]
    return torch.stack(draws).reshape(grid.n_steps, *x_shape)


def solve_torchsde(x, score_model, classifier, setting: Setting, noise=None, *, bm=None, adjoint=False,
                   adjoint_params=None, adjoint_method="euler"):
    """Solve Eq. 5 from state x (in [-1, 1]) with torchsde; returns the final state, x's shape.

    Give either `noise` ((N, *x.shape), as `purify` takes it) or a torchsde `bm`.  With
    adjoint=True, gradients come from torchsde's stochastic adjoint; adjoint_params=None uses
    every parameter of the models (DiffPure's configuration), () freezes them.
    """
    grid = setting.grid
    sde = GuidedReverseSDE(score_model, classifier, setting.lam, grid.t_star, x.shape)
    if bm is None:
        bm = GridBrownian(noise.to(x.dtype), grid.h)
    # float64 times keep the solver on the grid where the Brownian increments were taken.
    ts = torch.tensor([0.0, grid.t_star], dtype=torch.float64, device=x.device)
    y0 = x.reshape(x.shape[0], -1)
    if adjoint:
        extra = {} if adjoint_params is None else {"adjoint_params": tuple(adjoint_params)}
        ys = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="euler", adjoint_method=adjoint_method, dt=grid.h,
                                     **extra)
    else:
        ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=grid.h)
    return ys[-1].reshape(x.shape)


def purify_torchsde(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", noise=None, bm=None,
                    adjoint=False, adjoint_params=None):
    """`purify` through torchsde: images in [0, 1] -> purified images in [0, 1].

    For mode='diffpure', `noise` carries the forward-diffusion draw first (as in `purify`);
    with `bm`, pass the diffusion draw as noise of shape (1, *x.shape).
    """
    setting = validate(x, score_model, classifier, t_star=t_star, lam=lam, dt=dt, mode=mode, gradient="exact",
                       noise=None)
    state = image_to_state(x)
    step_noise = noise
    if mode == "diffpure":
        state = diffuse(state, setting.grid.t_star, noise[0].to(x.dtype))
        step_noise = noise[1:] if bm is None else None
    out = solve_torchsde(state, score_model, classifier, setting, step_noise, bm=bm, adjoint=adjoint,
                         adjoint_params=adjoint_params)
    return state_to_image(out).clamp(0.0, 1.0)


def purify_unrolled(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", noise=None, seed=0,
                    gradient="exact"):
    """`purify` with plain autograd through every step (all graphs kept): the gradient reference.

    Pure-torch noise (coup_fast.noise.philox_normal of `seed`) when `noise` is None.
    gradient='detached-guidance' treats the guidance as a constant, as the paper's code does.
    """
    setting = validate(x, score_model, classifier, t_star=t_star, lam=lam, dt=dt, mode=mode, gradient=gradient,
                       noise=noise)
    if noise is None:
        # purify's counters: steps k = 0..N-1, DiffPure's forward draw N (it comes first in `noise`)
        n = setting.grid.n_steps
        counters = ([n] if mode == "diffpure" else []) + list(range(n))
        draws = [philox_normal(seed, k, x.shape, dtype=x.dtype, device=x.device) for k in counters]
        noise = torch.stack(draws)
    source = Noise(x, setting, noise)
    state = image_to_state(x)
    if mode == "diffpure":
        state = diffuse(state, setting.grid.t_star, source.diffusion_eps(state))
    # Without create_graph the guidance is computed off the tape: a constant to autograd.
    out = solve(state, score_model, classifier, setting, source, create_graph=gradient != "detached-guidance")
    return state_to_image(out).clamp(0.0, 1.0)

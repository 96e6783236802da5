"""The torchsde solvers: the published COUP / DiffPure attack (`gradient='adjoint'`) and the torchsde reference.

torchsde integrates forward in time, so the reverse-time SDE of Eq. 5 is written, as DiffPure's and
COUP's official code write it, in torchsde's time tau = 1 - t, from tau = 1 - t* to 1 - t_end:

    dy = beta(t) (y/2 + s_theta(y, t) + lam grad log max_y p) dtau + sqrt(beta(t)) dW_tau,   t = 1 - tau.

- `solve_published`: the attack gradient of the official code, reproduced (docs/design.md §7):
  torchsde `sdeint_adjoint`, Euler, fixed dt (1e-3 in the paper), a torchsde BrownianInterval,
  ts = [1 - t*, 1 - 1e-5] (the path ends at t = 1e-5, its last step 1e-5 shorter), and the guidance
  computed on x.detach(): a constant to the adjoint, no lam H term.  It is the reference of the fast
  path (coup_fast.published, which the eager, compile and graph engines run); `TorchsdeEngine` runs it
  for purify(gradient='adjoint', engine='torchsde') on the fast path's own Brownian path.
- `solve_torchsde`: the same SDE on N uniform steps from t* to t_end.  With t_end = 0 (purify's grid)
  and the same Brownian increments `sdeint` reproduces purify step for step; with adjoint=True
  (t_end > 0) `sdeint_adjoint` gives a continuous adjoint that keeps lam H, forward and adjoint on one
  grid (coup_fast.reference uses both as oracles).
"""
from __future__ import annotations

import math

import torch
import torchsde
from torch import nn
from torchsde._brownian import BaseBrownian  # the interface sdeint expects of `bm`

from ..guidance import confidence_grad
from ..networks import batch_time
from ..published import T_END, GridPath, stepped_times, stream_path
from ..solver import PurifyConfig
from ..sde import vp_beta


class ReverseVPSDE(nn.Module):
    """Eq. 5 as a torchsde SDE (Ito, diagonal noise) in torchsde's time tau = 1 - t (DiffPure's RevVPSDE).

    States are flattened to (B, D) as torchsde requires; `shape` restores them for the networks.
    detach_guidance=True computes the guidance on y.detach() (the published code): the adjoint then
    sees it as a constant.  Otherwise the guidance is differentiable (create_graph) and the adjoint's
    vector-Jacobian products include lam H.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, score_model, classifier, lam: float, shape, detach_guidance: bool = False):
        super().__init__()
        # Registered as submodules when they are modules, so sdeint_adjoint can see their parameters
        # (DiffPure's cost: the score network's weights as adjoint parameters).
        self.score_model, self.classifier = score_model, classifier
        self.lam, self.shape, self.detach_guidance = float(lam), tuple(shape), detach_guidance

    def f(self, tau, y):
        t = 1.0 - float(tau)
        x = y.reshape(self.shape)
        drift = 0.5 * x + self.score_model(x, batch_time(x, t))
        if self.lam > 0:
            if self.detach_guidance:
                guidance = confidence_grad(self.classifier, x.detach())
            else:
                guidance = confidence_grad(self.classifier, x, create_graph=y.requires_grad)
            drift = drift + self.lam * guidance
        return (vp_beta(t) * drift).reshape(y.shape)

    def g(self, tau, y):
        return torch.full_like(y, math.sqrt(vp_beta(1.0 - float(tau))))


def uniform_step(t_star: float, t_end: float, n_steps: int) -> float:
    """The step of N uniform torchsde steps from 1 - t* to 1 - t_end.  torchsde steps with next =
    min(current + step, end): a step a hair longer than (t* - t_end)/N makes float round-off end the N-th
    step at `end` instead of leaving a spurious (N+1)-th of ~1e-16."""
    return (t_star - t_end) / n_steps * (1 + 1e-10)


def torchsde_times(t_star: float, t_end: float, step: float) -> list[float]:
    """The torchsde times tau_0 .. tau_N an Euler solve from 1 - t* to 1 - t_end visits with step `step`
    (torchsde's rule: next = min(current + step, end), in float64)."""
    return list(stepped_times(1.0 - t_star, 1.0 - t_end, step))


class PathBrownian(BaseBrownian):
    """A coup_fast Brownian path (coup_fast.published: PhiloxPath, GridPath) as torchsde's `bm`: its increments,
    flattened to the (rows, D) torchsde integrates.  like: a tensor of the state's shape (its values unused)."""

    def __init__(self, path, like: torch.Tensor):
        super().__init__()
        self.path, self._like = path, torch.empty_like(like, memory_format=torch.contiguous_format)

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        return self.path(float(ta), float(tb), self._like).reshape(self._like.shape[0], -1)

    def __repr__(self):
        return f"PathBrownian({type(self.path).__name__})"

    @property
    def dtype(self):
        return self._like.dtype

    @property
    def device(self):
        return self._like.device

    @property
    def shape(self):
        return torch.Size((self._like.shape[0], self._like[0].numel()))

    @property
    def levy_area_approximation(self):
        return "none"


class GridBrownian(PathBrownian):
    """A Brownian path given by its increments on a grid: W(tau_{k+1}) - W(tau_k) = sqrt(tau_{k+1} - tau_k) z_k.

    Lets torchsde run on exactly the noise `purify` uses.  Queries are snapped to the nearest grid time (the
    adjoint's own grid may sit a little off the forward one, as on the published grid): coup_fast.published.GridPath.
    """

    def __init__(self, times, noise: torch.Tensor):
        super().__init__(GridPath(times, noise), noise[0])

    def __repr__(self):
        return f"GridBrownian(steps={len(self.path.times) - 1})"


def brownian_interval(x: torch.Tensor, t_star: float, *, seed: int = 0, t_end: float = 0.0) -> torchsde.BrownianInterval:
    """A torchsde BrownianInterval on tau in [1 - t*, 1 - t_end] for states shaped like x (flattened per row)."""
    return torchsde.BrownianInterval(t0=1.0 - float(t_star), t1=1.0 - float(t_end), size=(x.shape[0], x[0].numel()),
                                     dtype=x.dtype, device=x.device, entropy=seed)


def _integrate(sde, x, times_args, bm, adjoint: bool, adjoint_params, adjoint_method: str):
    tau0, tau1, step = times_args
    # float64 times keep the solver on the grid where the Brownian increments were taken.
    ts = torch.tensor([tau0, tau1], dtype=torch.float64, device=x.device)
    y0 = x.reshape(x.shape[0], -1)
    if adjoint:
        extra = {} if adjoint_params is None else {"adjoint_params": tuple(adjoint_params)}
        ys = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="euler", adjoint_method=adjoint_method, dt=step,
                                     **extra)
    else:
        ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=step)
    return ys[-1].reshape(x.shape)


def solve_torchsde(x, score_model, classifier, config: PurifyConfig, noise=None, *, bm=None, t_end: float = 0.0,
                   adjoint=False, adjoint_params=None, adjoint_method="euler"):
    """Solve Eq. 5 from state x (in [-1, 1]) with torchsde on N uniform steps from t* to t_end.

    Give either `noise` ((N, *x.shape), as `purify` takes it) or a torchsde `bm` on tau in
    [1 - t*, 1 - t_end].  t_end = 0 is purify's grid.  With adjoint=True (needs t_end > 0, e.g.
    T_END) gradients come from torchsde's stochastic adjoint, lam H included; adjoint_params=None uses
    every parameter of the models that requires grad (DiffPure's configuration), () freezes them.
    """
    grid = config.grid
    if adjoint and not t_end > 0:
        raise ValueError(f"t_end: the continuous adjoint evaluates the drift at the end time first and epsilon-model "
                         f"scores diverge at t = 0; pass t_end > 0 (the official code's is {T_END}), got {t_end!r}")
    step = uniform_step(grid.t_star, t_end, grid.n_steps)
    if bm is None:
        bm = GridBrownian(torchsde_times(grid.t_star, t_end, step), noise.to(x.dtype))
    sde = ReverseVPSDE(score_model, classifier, config.lam, x.shape)
    return _integrate(sde, x, (1.0 - grid.t_star, 1.0 - t_end, step), bm, adjoint, adjoint_params, adjoint_method)


def solve_published(x, score_model, classifier, config: PurifyConfig, *, noise=None, bm=None, seed: int = 0,
                    adjoint: bool = True, adjoint_params=()):
    """The official COUP / DiffPure attack's solve from state x in [-1, 1] (module docstring).

    torchsde Euler with dt = h = t*/N (1e-3 in the paper) on ts = [1 - t*, 1 - 1e-5], guidance detached.
    Noise: a torchsde `bm`, or `noise` ((N, *x.shape) increments on that grid, the last step's over
    h - 1e-5), or else a BrownianInterval with entropy `seed`, as the official code draws it.
    adjoint_params=(): the gradient is taken with respect to x only.  The official code also carries the
    networks' parameters as adjoint states; that adds to the cost, not to the input gradient (torchsde
    takes the state's part of each vector-Jacobian product on its own).
    """
    grid = config.grid
    if bm is None and noise is not None:
        bm = GridBrownian(torchsde_times(grid.t_star, T_END, grid.h), noise.to(x.dtype))
    elif bm is None:
        bm = brownian_interval(x, grid.t_star, seed=seed, t_end=T_END)
    sde = ReverseVPSDE(score_model, classifier, config.lam, x.shape, detach_guidance=True)
    with torch.set_grad_enabled(adjoint and torch.is_grad_enabled()):
        return _integrate(sde, x, (1.0 - grid.t_star, 1.0 - T_END, grid.h), bm, adjoint and torch.is_grad_enabled(),
                          adjoint_params, "euler")


class TorchsdeEngine:
    """engine='torchsde': the published attack (gradient='adjoint') in torchsde, the reference solver.  Its noise is
    the fast engines' (coup_fast.published.stream_path: the Philox path of the call's seeds, one per sample, or the
    explicit draws), so an A/B on one seed compares solvers, not noise; the official BrownianInterval is
    coup_fast.reference.purify_published's."""

    name = "torchsde"

    def unsupported(self, x, noise=None, gradient="exact", samples=1) -> str | None:
        return None if gradient == "adjoint" else "it runs the published attack (gradient='adjoint') only"

    def solve(self, x, score_model, classifier, config, stream, gradient="adjoint", memory="lean"):
        bm = PathBrownian(stream_path(stream, config), x)  # the K samples in one solve: each has its own path
        return solve_published(x, score_model, classifier, config, bm=bm, adjoint=x.requires_grad)

    def clear(self):
        pass


ENGINE = TorchsdeEngine()

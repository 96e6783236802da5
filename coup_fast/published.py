"""The published attack (gradient='adjoint') on coup_fast's own solver: torchsde's Euler forward on the
official grid and torchsde's continuous adjoint, step for step (docs/design.md §7).

The official COUP / DiffPure attack integrates Eq. 5 in torchsde's time tau = 1 - t with `sdeint_adjoint`,
Euler, dt = h = t*/N and ts = [1 - t*, 1 - T_END], the guidance computed on x.detach().  With
f(tau, y) = beta(t) (y/2 + s(y, t) + lam g(y)) and sigma(tau) = sqrt(beta(t)), t = 1 - tau:

    forward    tau_0 = 1 - t*,  tau_{k+1} = min(tau_k + h, 1 - T_END)                 (N steps, the last 1e-5 short)
               y_{k+1} = y_k + f(tau_k, y_k) dtau_k + sigma(tau_k) (W(tau_{k+1}) - W(tau_k))
    backward   torchsde's adjoint SDE on [y, a] in time r = -tau:
               r_0 = -(1 - T_END),  r_{j+1} = min(r_j + h, -(1 - t*)),  tau_j' = -r_j,  dr_j = r_{j+1} - r_j
               y <- y - f(tau_j', y) dr_j - sigma(tau_j') (W(tau_j') - W(tau_{j+1}'))    (the path, reconstructed)
               a <- a + dr_j J_f(tau_j', y)^T a = a + beta dr_j (a/2 + J_s(y)^T a)     (guidance detached: no lam H)
               both from the same (y, a): one Euler step of the augmented state.

The backward grid is t = T_END, T_END + h, ..., not the forward's t* - k h, and g does not depend on y, so
torchsde's Ito corrections (g dg/dy terms) vanish.  Only the final state is kept: the backward rebuilds
the path from it, so memory is flat in N (`PublishedSolve`).

The Brownian path is queried at the times of both grids.  `PhiloxPath` is a Brownian motion on their union
from coup_fast's counter-based draws (replayable, never stored, seeds in device memory: CUDA-graph replays
draw fresh noise, docs/design.md §5); `GridPath` is a path given by explicit increments on the forward grid
(purify's `noise`); `QueriedPath` asks any torchsde Brownian motion (a BrownianInterval) for the increments.
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch

from . import ops
from .noise import rng_table
from .sde import ReverseGrid, vp_beta
from .solver import NoiseStream, PurifyConfig

T_END = 1e-5  # the official code's reverse path ends at t = 1e-5: ts = [1 - t*, 1 - 1e-5] in torchsde's time
_SAME_TIME = 1e-12  # grid times closer than this are one time (torchsde's times are float64 near 1)


def stepped_times(start: float, end: float, step: float) -> tuple:
    """The times a fixed-step torchsde solve visits from `start` to `end`: next = min(current + step, end),
    in float64, as torchsde's BaseSDESolver.integrate steps them (so they are its times bit for bit)."""
    times = [start]
    while times[-1] < end:
        times.append(min(times[-1] + step, end))
    return tuple(times)


@dataclass(frozen=True)
class PublishedGrid:
    """The times of the published forward and of torchsde's adjoint, and the union the Brownian path lives on.

    forward: tau_0 .. tau_N (torchsde time, ascending); backward: r_0 .. r_M (the adjoint's time r = -tau,
    ascending, so tau descending).  union: every tau of both, ascending; sub-interval i = [union[i],
    union[i + 1]] draws Philox counter counters[i]: the first sub-interval of forward step k draws k (purify's
    step counter), every further one N + 1, N + 2, ... in order, so counter N stays DiffPure's diffusion draw.
    """

    forward: tuple
    backward: tuple
    union: tuple
    counters: tuple

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, grid: ReverseGrid) -> "PublishedGrid":
        forward = stepped_times(1.0 - grid.t_star, 1.0 - T_END, grid.h)
        backward = stepped_times(-(1.0 - T_END), -(1.0 - grid.t_star), grid.h)
        union = []
        for tau in sorted({*forward, *(-r for r in backward)}):
            if not union or tau - union[-1] > _SAME_TIME:
                union.append(tau)
        counters, extra = [None] * (len(union) - 1), len(forward)  # len(forward) = N + 1: counter N is skipped
        for k in range(len(forward) - 1):
            first, last = _index(union, forward[k]), _index(union, forward[k + 1])
            counters[first] = k
            for i in range(first + 1, last):
                counters[i], extra = extra, extra + 1
        return cls(forward, backward, tuple(union), tuple(counters))

    @property
    def n_forward(self) -> int:
        return len(self.forward) - 1

    @property
    def n_backward(self) -> int:
        return len(self.backward) - 1

    @property
    def n_counters(self) -> int:
        """Rows of a seed's (seed, counter) table: every counter the path draws, and N (the diffusion draw)."""
        return max(max(self.counters), self.n_forward) + 1

    def forward_step(self, k: int):
        """(t, dtau, (tau_a, tau_b)) of forward step k: f and sigma at t = 1 - tau_k, the increment over
        [tau_a, tau_b]."""
        tau_a, tau_b = self.forward[k], self.forward[k + 1]
        return 1.0 - tau_a, tau_b - tau_a, (tau_a, tau_b)

    def backward_step(self, j: int):
        """(t, dr, (tau_a, tau_b)) of backward step j: f, sigma and the VJP at t = 1 - (-r_j) (torchsde evaluates the
        forward SDE at tau = -r), the step dr = r_{j+1} - r_j > 0, the increment W(tau_b) - W(tau_a) over
        [tau_a, tau_b] = [-r_{j+1}, -r_j] (torchsde's ReverseBrownian)."""
        r_a, r_b = self.backward[j], self.backward[j + 1]
        return 1.0 - (-r_a), r_b - r_a, (-r_b, -r_a)

    def sub_intervals(self, tau_a: float, tau_b: float):
        """(counter, sqrt(length)) of each union sub-interval making up [tau_a, tau_b] (both union times)."""
        first, last = _index(self.union, tau_a), _index(self.union, tau_b)
        return [(self.counters[i], math.sqrt(self.union[i + 1] - self.union[i])) for i in range(first, last)]


def _index(times, tau: float) -> int:
    """The index of the grid time `tau` in the ascending `times` (a query off the grid is an error)."""
    i = bisect.bisect_left(times, tau - _SAME_TIME)
    if i == len(times) or abs(times[i] - tau) > _SAME_TIME:
        raise ValueError(f"noise: the Brownian path was queried at tau = {tau!r}, which is not a time of the "
                         f"published grid")
    return i


# --------------------------------------------------------------------------- Brownian paths
# A path is called as path(tau_a, tau_b, like) -> W(tau_b) - W(tau_a), shaped like the state `like`, for
# tau_a < tau_b both times of the grids (torchsde time).
class PhiloxPath:
    """Brownian motion on the union grid from Philox draws: sub-interval i contributes sqrt(length_i) z_{counters[i]}
    (docs/design.md §5: z from (seed, counter) in a device table, so nothing is stored and a CUDA-graph replay
    after a new seed is written draws a fresh path).  tables: one (n_counters, 2) int64 table per sample;
    sample r owns rows r B .. (r + 1) B - 1 of the state, as separate calls of one sample would."""

    def __init__(self, grid: PublishedGrid, tables: list, rows=None):
        self.grid, self.tables, self.rows = grid, tables, rows  # rows: purify's (ids, width), as NoiseStream's

    def _sample(self, like, table, parts):
        full = like if self.rows is None else like.new_empty((self.rows[1], *like.shape[1:]))
        (counter, scale), *rest = parts
        inc = ops.normal_noise(full, table[counter]) * scale
        for counter, scale in rest:
            inc.add_(ops.normal_noise(full, table[counter]), alpha=scale)
        return inc if self.rows is None else inc.index_select(0, self.rows[0])

    def __call__(self, tau_a: float, tau_b: float, like):
        parts = self.grid.sub_intervals(tau_a, tau_b)
        if len(self.tables) == 1:
            return self._sample(like, self.tables[0], parts)
        rows = like.shape[0] // len(self.tables)
        return torch.cat([self._sample(like[r * rows:(r + 1) * rows], table, parts)
                          for r, table in enumerate(self.tables)])


class GridPath:
    """A path given by its increments on a grid: W(times[k + 1]) - W(times[k]) = sqrt(times[k + 1] - times[k]) z_k.
    Queries snap to the nearest grid time: the adjoint's times sit between the forward's, and a path given on the
    forward grid is constant in between (purify's explicit `noise` for gradient='adjoint').
    draws: (n, rows, ...) standard normals for the n steps of `times`."""

    def __init__(self, times, draws: torch.Tensor):
        n = draws.shape[0]
        if len(times) != n + 1:
            raise ValueError(f"noise: expected {len(times) - 1} draws for the {len(times) - 1} steps of the grid, "
                             f"got {n}")
        steps = torch.tensor([b - a for a, b in zip(times[:-1], times[1:])], dtype=draws.dtype, device=draws.device)
        inc = steps.sqrt().reshape(n, *([1] * (draws.ndim - 1))) * draws
        self.cum = torch.cat([torch.zeros_like(inc[:1]), inc.cumsum(0)])  # W at times[0] .. times[n]
        self.times = list(times)

    def _w(self, tau: float):
        i = bisect.bisect_left(self.times, tau)
        if i == len(self.times) or (i > 0 and tau - self.times[i - 1] <= self.times[i] - tau):
            i -= 1
        return self.cum[i]

    def __call__(self, tau_a: float, tau_b: float, like):
        return (self._w(tau_b) - self._w(tau_a)).reshape(like.shape)


class QueriedPath:
    """The increments of torchsde Brownian motions (e.g. BrownianInterval on [1 - t*, 1 - T_END], of size (B, D)),
    one per sample, asked at exactly the times torchsde's solve asks them (in the same order, so a
    BrownianInterval, whose values depend on its query history, gives the same path): the fast solver on
    the official noise."""

    def __init__(self, brownians):
        self.brownians = list(brownians)

    def __call__(self, tau_a: float, tau_b: float, like):
        parts = [bm(tau_a, tau_b) for bm in self.brownians]
        inc = parts[0] if len(parts) == 1 else torch.cat(parts)
        return inc.reshape(like.shape).to(like.dtype)


def philox_tables(seeds, grid: PublishedGrid, device) -> list:
    """One (n_counters, 2) (seed, counter) device table per seed."""
    return [rng_table(seed, grid.n_counters, device) for seed in seeds]


def stream_path(stream: NoiseStream, config: PurifyConfig):
    """The path of a purify call's noise: explicit draws as a GridPath on the forward grid, else the Philox path
    of the stream's seeds (one per sample)."""
    grid = PublishedGrid.of(config.grid)
    draws = stream.step_draws()
    if draws is not None:
        return GridPath(grid.forward, draws)
    return PhiloxPath(grid, philox_tables(stream.seeds, grid, stream.device), stream.rows)


# --------------------------------------------------------------------------- the solve
def euler_step(y, score, guidance, lam: float, t: float, dtau: float, dw, back: bool = False):
    """torchsde's Euler step of Eq. 5 in tau: y + f dtau + sigma dW with f = beta (y/2 + s + lam g), sigma =
    sqrt(beta), beta = beta(t); back=True steps the path back, y - f dtau - sigma dW (the adjoint's
    reconstruction).  guidance may be None (lam = 0)."""
    beta, sign = vp_beta(t), -1.0 if back else 1.0
    drift = torch.add(score, y, alpha=0.5)
    if guidance is not None and lam != 0.0:
        drift = drift.add_(guidance, alpha=lam)
    return y.add(drift, alpha=sign * beta * dtau).add_(dw, alpha=sign * math.sqrt(beta))


def published_forward(x, nets, config: PurifyConfig, path, n_steps: int | None = None):
    """The published forward from state x (in [-1, 1]): Euler on the official grid, t* down to T_END
    (its first `n_steps` steps only, for a CUDA-graph warm-up)."""
    grid = PublishedGrid.of(config.grid)
    for k in range(grid.n_forward if n_steps is None else min(n_steps, grid.n_forward)):
        t, dtau, (tau_a, tau_b) = grid.forward_step(k)
        score, guidance = nets.drift_terms(x, t, config.lam)
        if k == 0 and (not torch.is_tensor(score) or score.shape != x.shape):
            got = tuple(score.shape) if torch.is_tensor(score) else type(score).__name__
            raise ValueError(f"score_model: expected a score of x's shape {tuple(x.shape)}, got {got}")
        x = euler_step(x, score, guidance, config.lam, t, dtau, path(tau_a, tau_b, x))
    return x


def published_adjoint(y, a, nets, config: PurifyConfig, path, n_steps: int | None = None):
    """torchsde's continuous adjoint from the final state y and a = dL/dy: dL/dx_0 (after its first `n_steps`
    steps only, for a CUDA-graph warm-up).  Each step evaluates the drift and the score's VJP at the
    reconstructed state, then steps [y, a] back together (module docstring)."""
    grid = PublishedGrid.of(config.grid)
    for j in range(grid.n_backward if n_steps is None else min(n_steps, grid.n_backward)):
        t, dr, (tau_a, tau_b) = grid.backward_step(j)
        score, guidance, vjp = nets.drift_and_score_vjp(y, a, t, config.lam)
        y_back = euler_step(y, score, guidance, config.lam, t, dr, path(tau_a, tau_b, y), back=True)
        a = ops.adjoint_update(a, vjp.to(a.dtype), vp_beta(t) * dr)  # a + beta dr (a/2 + J_s^T a)
        y = y_back
    return a


class PublishedSolve(torch.autograd.Function):
    """Forward: `published_forward`.  Backward: `published_adjoint` from the saved final state, the only tensor
    kept (memory flat in N)."""

    @staticmethod
    def forward(ctx, x, nets, config, path):
        with torch.no_grad():
            out = published_forward(x, nets, config, path)
        ctx.save_for_backward(out)
        ctx.nets, ctx.config, ctx.path = nets, config, path
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        return published_adjoint(out, grad_out.contiguous(), ctx.nets, ctx.config, ctx.path), None, None, None


def published_solve(x, nets, config: PurifyConfig, path):
    """The published attack's solve from state x: x_N at t = T_END, differentiable in x by torchsde's
    continuous adjoint (a plain forward when no gradient is needed).  nets: a networks.Networks; path: a
    Brownian path (PhiloxPath, GridPath, QueriedPath)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            return published_forward(x, nets, config, path)
    return PublishedSolve.apply(x, nets, config, path)

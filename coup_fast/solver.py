"""The solver: the guided reverse SDE by Euler-Maruyama, and the purification pipeline around it.

    solve(x, config, stream, drift)      x_0 -> x_N, Eq. 5 (docs/design.md §2)
    pipeline(u, config, stream, solve)   image -> state -> (DiffPure's diffusion) -> solve -> (BPDA) -> image

`solve` asks `drift(k, t, x)` for each step's (score, guidance) and the noise stream for the step
itself, so the plain solve, the unrolled reference (`unrolled_drift`), the lean adjoint's recording
(`recording_drift`) and the memory='fast' adjoint (adjoint.kept_drift) are one loop.  `pipeline` is
the one place the stages around the solve are written; every engine and both reference paths go
through it (docs/design.md §6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from . import ops
from .guidance import image_to_state, state_to_image
from .noise import diffusion_counter, draw_seed, philox_normal, rng_table
from .sde import ReverseGrid, diffuse, euler_maruyama_step

MODES = ("coup", "reverse", "diffpure")


@dataclass(frozen=True)
class PurifyConfig:
    """Everything a purification needs besides the tensors: the time grid, the guidance weight lam
    (0 unless mode is 'coup'), the mode and DiffPure's forward marginal (sde.DIFFUSION_SCHEDULES)."""

    grid: ReverseGrid
    lam: float
    mode: str
    diffusion: str = "ddpm"

    @property
    def n_draws(self) -> int:
        """Standard-normal draws of x's shape: N steps (+1 for DiffPure's forward diffusion)."""
        return self.grid.n_steps + (self.mode == "diffpure")


class StepNoise(Protocol):
    """Where a step's noise comes from: the step x_{k+1} = x_k + beta h (x/2 + s + lam g) + sqrt(beta h) z_k."""

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float) -> torch.Tensor:
        """x_{k+1} with this stream's z_k."""


class NoiseStream:
    """The draws of one purification: a given tensor, or the counter-based stream of one seed.

    noise: (n_draws, *x.shape) standard normals used exactly (DiffPure's diffusion draw first), or
    None: z_k is the Philox stream of `seed`, regenerated, never stored (docs/design.md §5); without a
    seed one is drawn from `generator` (torch's global RNG if None).
    """

    def __init__(self, like: torch.Tensor, config: PurifyConfig, noise=None, generator=None, seed: int | None = None):
        self.config, self.device = config, like.device
        self.tensor = None if noise is None else noise.to(like.dtype)
        if noise is not None:
            self.seed = None
        else:
            self.seed = draw_seed(generator) if seed is None else int(seed)
        self.offset = int(config.mode == "diffpure")  # the step draws' first row in `tensor`
        self._table = None

    @property
    def table(self) -> torch.Tensor:
        """The (N + 1, 2) device table of (seed, counter) rows the fused ops read (made on first use)."""
        if self._table is None:
            self._table = rng_table(self.seed, self.config.grid.n_steps + 1, self.device)
        return self._table

    def diffusion_eps(self, like):
        """DiffPure's forward-diffusion draw; it depends on x's shape only, never on its values."""
        if self.tensor is not None:
            return self.tensor[0]
        return ops.normal_noise(like.detach(), self.table[diffusion_counter(self.config.grid.n_steps)])

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float):
        if self.tensor is not None:
            return euler_maruyama_step(x, score, guidance, beta_dt, lam, self.tensor[self.offset + k])
        return ops.em_step(x, score, guidance, self.table[k], beta_dt, lam)

    def step_draws(self):
        """The explicit step draws ((N, *shape), None for a seeded stream)."""
        return None if self.tensor is None else self.tensor[self.offset:]

    def as_tensor(self, like) -> torch.Tensor:
        """Every draw as an explicit (n_draws, *shape) tensor in `noise`'s layout, by the pure-torch recipe."""
        if self.tensor is not None:
            return self.tensor
        n = self.config.grid.n_steps
        counters = ([diffusion_counter(n)] if self.offset else []) + list(range(n))
        return torch.stack([philox_normal(self.seed, k, like.shape, dtype=like.dtype, device=like.device)
                            for k in counters])


# Drift strategies: drift(k, t, x) -> (score, guidance or None) for step k at time t.
def plain_drift(nets, lam: float) -> Callable:
    """The networks' drift terms, nothing kept (a forward without gradient, or under no_grad)."""
    return lambda k, t, x: nets.drift_terms(x, t, lam)


def unrolled_drift(nets, lam: float, detach_guidance: bool = False) -> Callable:
    """Every step on the autograd tape (the unrolled reference); detach_guidance keeps g off it."""
    return lambda k, t, x: nets.drift_terms(x, t, lam, create_graph=not detach_guidance)


def recording_drift(nets, lam: float, trajectory: list) -> Callable:
    """As plain_drift, appending each step's start state x_k to `trajectory` (the lean adjoint's record)."""
    def drift(k, t, x):
        trajectory.append(x)
        return nets.drift_terms(x, t, lam)
    return drift


def solve(x, config: PurifyConfig, stream: StepNoise, drift: Callable, callback=None):
    """Run the guided reverse SDE from t* to 0 on states x in [-1, 1] (Eq. 5, Euler-Maruyama).

    drift(k, t, x) gives each step's score and guidance (see the strategies above); `stream` takes
    the step.  callback({'k', 't', 'x'}) is called after each step with the new state.
    """
    grid = config.grid
    for k in range(grid.n_steps):
        t_k = grid.t(k)
        score, guidance = drift(k, t_k, x)
        if k == 0 and score.shape != x.shape:  # the pure-torch step would broadcast it silently
            raise ValueError(f"score_model: expected a score of x's shape {tuple(x.shape)}, got {tuple(score.shape)}")
        x = stream.step(x, score, guidance, k, grid.beta_dt(k), config.lam)
        if callback is not None:
            callback({"k": k, "t": t_k, "x": x})
    return x


def pipeline(u, config: PurifyConfig, stream: NoiseStream, solve_state: Callable, gradient: str = "exact"):
    """Purify images u in [0, 1] (docs/design.md §6): x = 2u - 1; DiffPure's forward diffusion with the
    stream's diffusion draw (mode 'diffpure'); x_N = solve_state(x); gradient 'bpda' makes the solve
    straight-through (its forward as usual, an identity Jacobian from the start state); back to images,
    clamped to [0, 1]."""
    start = x = image_to_state(u)
    if config.mode == "diffpure":
        x = diffuse(x, config.grid.t_star, stream.diffusion_eps(x), config.diffusion)
    if gradient == "bpda":
        with torch.no_grad():
            out = solve_state(x)
        out = start + (out - start).detach()
    else:
        out = solve_state(x)
    return state_to_image(out).clamp(0.0, 1.0)

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

from . import kinks, ops
from .guidance import image_to_state, state_to_image
from .lm import LMConfig
from .noise import diffusion_counter, draw_seed, philox_normal, rng_table
from .sde import ReverseGrid, diffuse, euler_maruyama_step

# The SDE purifiers, and the DDPM variant of Sec. 5.2.1: likelihood maximization (coup_fast.lm), guided by lam.
MODES = ("coup", "reverse", "diffpure", "likelihood-max")
LM_MODE = "likelihood-max"
# Whether a mode clamps the purified image to [0, 1] before the classifier, as its published code runs it:
# NVlabs' DiffPure hands (x + 1)/2 of the final state over unclamped (COUP's fork of it clamps); COUP's code
# clamps; Chen et al.'s LM clamps its final image (docs/design.md §6).
CLAMPS_OUTPUT = {"coup": True, "reverse": True, "diffpure": False, LM_MODE: True}


@dataclass(frozen=True)
class PurifyConfig:
    """Everything a purification needs besides the tensors: the time grid, the guidance weight lam
    (0 unless mode is 'coup'), the mode, DiffPure's forward marginal (sde.DIFFUSION_SCHEDULES), for
    mode 'likelihood-max' the LM settings (its own guidance weight in lm.lam; the grid is unused), and
    whether the purified image is clamped to [0, 1] (None: the mode's CLAMPS_OUTPUT)."""

    grid: ReverseGrid
    lam: float
    mode: str
    diffusion: str = "ddpm"
    lm: LMConfig | None = None
    clamp: bool | None = None

    @property
    def clamps_output(self) -> bool:
        return CLAMPS_OUTPUT[self.mode] if self.clamp is None else self.clamp

    @property
    def n_draws(self) -> int:
        """Standard-normal draws of x's shape: N steps (+1 for DiffPure's forward diffusion)."""
        return self.grid.n_steps + (self.mode == "diffpure")


class StepNoise(Protocol):
    """Where a step's noise comes from: the step x_{k+1} = x_k + beta h (x/2 + s + lam g) + sqrt(beta h) z_k."""

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float) -> torch.Tensor:
        """x_{k+1} with this stream's z_k."""


class NoiseStream:
    """The draws of one purification: a given tensor, or the counter-based stream of one seed per sample.

    noise: (n_draws, *x.shape) standard normals used exactly (DiffPure's diffusion draw first), or
    None: z_k is the Philox stream of a seed, regenerated, never stored (docs/design.md §5); without a
    seed one is drawn from `generator` (torch's global RNG if None).  samples = K > 1: x holds K
    samples of B rows each, and sample r draws from the r-th of K seeds drawn in order, exactly as the
    r-th of K calls of one sample would (batched EOT).  rows = (ids, width): the B images are the rows `ids` of a
    virtual batch of `width` images and draw exactly that batch's noise at those rows (the fused ops make the whole
    virtual batch's draw and keep those rows), so an image's noise is the same whichever subset of the batch is
    purified: what lets an evaluation attack only the images still standing (coup_fast.schedule).
    """

    def __init__(self, like: torch.Tensor, config: PurifyConfig, noise=None, generator=None, seed: int | None = None,
                 samples: int = 1, rows=None):
        self.config, self.device = config, like.device
        self.tensor = None if noise is None else noise.to(like.dtype)
        self.rows = rows  # (ids, width): the images are rows `ids` of a virtual batch of `width` (check_rows)
        if noise is not None:
            self.seeds = []
        elif seed is not None:
            self.seeds = [int(seed)]
        else:
            self.seeds = [draw_seed(generator) for _ in range(samples)]
        self.seed = self.seeds[0] if self.seeds else None
        self.offset = int(config.mode == "diffpure")  # the step draws' first row in `tensor`
        self._tables = None

    @property
    def tables(self) -> list:
        """Per seed, the (N + 1, 2) device table of (seed, counter) rows the fused ops read (made on first use)."""
        if self._tables is None:
            self._tables = [rng_table(seed, self.config.grid.n_steps + 1, self.device) for seed in self.seeds]
        return self._tables

    @property
    def table(self) -> torch.Tensor:
        return self.tables[0]

    def _per_sample(self, op, *tensors):
        """op(sample r's slices, table r) for each sample, concatenated (one call when there is one sample)."""
        if len(self.seeds) == 1:
            return op(*tensors, self.table)
        rows = tensors[0].shape[0] // len(self.seeds)
        parts = [op(*[None if t is None else t[r * rows:(r + 1) * rows] for t in tensors], table)
                 for r, table in enumerate(self.tables)]
        return torch.cat(parts)

    def _draw(self, part, rng_row):
        """The stream's draw for the rows of `part` (one sample): itself, or, with `rows`, those rows of the draw of
        the whole virtual batch, so that an image's noise does not depend on which others share its batch."""
        if self.rows is None:
            return ops.normal_noise(part, rng_row)
        ids, width = self.rows
        return ops.normal_noise(part.new_empty((width, *part.shape[1:])), rng_row).index_select(0, ids)

    def diffusion_eps(self, like):
        """DiffPure's forward-diffusion draw; it depends on x's shape only, never on its values."""
        if self.tensor is not None:
            return self.tensor[0]
        counter = diffusion_counter(self.config.grid.n_steps)
        return self._per_sample(lambda part, table: self._draw(part, table[counter]), like.detach())

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float):
        if self.tensor is not None:
            return euler_maruyama_step(x, score, guidance, beta_dt, lam, self.tensor[self.offset + k])
        if self.rows is not None:
            return self._per_sample(lambda x, s, g, table: euler_maruyama_step(
                x, s, g, beta_dt, lam, self._draw(x.detach(), table[k])), x, score, guidance)
        return self._per_sample(lambda x, s, g, table: ops.em_step(x, s, g, table[k], beta_dt, lam), x, score, guidance)

    def step_draws(self):
        """The explicit step draws ((N, *shape), None for a seeded stream)."""
        return None if self.tensor is None else self.tensor[self.offset:]

    def as_tensor(self, like) -> torch.Tensor:
        """Every draw as an explicit (n_draws, *shape) tensor in `noise`'s layout, by the pure-torch recipe."""
        if self.tensor is not None:
            return self.tensor
        n = self.config.grid.n_steps
        counters = ([diffusion_counter(n)] if self.offset else []) + list(range(n))
        rows = like.shape[0] // len(self.seeds)
        ids, width = self.rows if self.rows is not None else (None, rows)
        shape = (width, *like.shape[1:])

        def draw(seed, k):
            z = philox_normal(seed, k, shape, dtype=like.dtype, device=like.device)
            return z if ids is None else z.index_select(0, ids)
        return torch.stack([torch.cat([draw(seed, k) for seed in self.seeds]) for k in counters])


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
        if k == 0 and not torch.is_tensor(score):
            raise ValueError(f"score_model: expected a score tensor of x's shape, got {type(score).__name__}")
        if k == 0 and score.shape != x.shape:  # the pure-torch step would broadcast it silently
            raise ValueError(f"score_model: expected a score of x's shape {tuple(x.shape)}, got {tuple(score.shape)}")
        x = stream.step(x, score, guidance, k, grid.beta_dt(k), config.lam)
        if callback is not None:
            callback({"k": k, "t": t_k, "x": x})
    return x


class _CheckedGradient(torch.autograd.Function):
    """The identity, whose backward checks once that the gradient reaching the start state is finite."""

    @staticmethod
    def forward(ctx, x, on_non_finite):
        ctx.on_non_finite = on_non_finite
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if not torch.isfinite(grad).all():
            ctx.on_non_finite(grad)
        return grad, None


def pipeline(u, config: PurifyConfig, stream: NoiseStream, solve_state: Callable, gradient: str = "exact",
             check=None):
    """Purify images u in [0, 1] (docs/design.md §6): x = 2u - 1; DiffPure's forward diffusion with the
    stream's diffusion draw (mode 'diffpure'); x_N = solve_state(x); gradient 'bpda' makes the solve
    straight-through (its forward as usual, an identity Jacobian from the start state); back to images
    (x_N + 1)/2, clamped to [0, 1] when config.clamps_output (not for DiffPure by default: its images
    may then leave [0, 1]).

    check: a NonFiniteCheck (or None): the final state, and in the backward pass the gradient reaching
    the images, are checked once for NaN and Inf, and it raises naming the cause.
    """
    start = x = image_to_state(u)
    if check is not None and torch.is_grad_enabled() and x.requires_grad:
        start = x = _CheckedGradient.apply(x, check.gradient)
    if config.mode == "diffpure":
        x = diffuse(x, config.grid.t_star, stream.diffusion_eps(x), config.diffusion)
    if gradient == "bpda":
        with torch.no_grad():
            out = solve_state(x)
        out = start + (out - start).detach()
    else:
        out = solve_state(x)
    if check is not None and not torch.isfinite(out).all():  # once per call, after the loop: no per-step cost
        check.forward(x.detach())
    image = state_to_image(out)
    # a pixel exactly on 0 or 1 keeps its gradient (docs/design.md §11)
    return kinks.clamp(image, 0.0, 1.0) if config.clamps_output else image


class NonFiniteCheck:
    """What to say when a purification gives NaN or Inf: which network produced it, at which step.

    The diagnosis reruns the solve eagerly (same draws) checking every step's score, guidance and
    state, so it costs nothing unless something already went wrong.
    """

    def __init__(self, nets, config: PurifyConfig, stream: NoiseStream):
        self.nets, self.config, self.stream = nets, config, stream

    def forward(self, x):
        nets, lam = self.nets, self.config.lam
        if self.config.mode == LM_MODE:
            raise ValueError("score_model: the likelihood-max purification gave NaN or Inf (the eps-network's loss "
                             "gradient, or the classifier's guidance); purify(check_finite=False) skips this check")

        def drift(k, t, state):
            where = f"at step {k} (t = {t:.4g}, states up to |x| = {float(state.abs().max()):.3g})"
            if not torch.isfinite(state).all():
                raise ValueError(f"noise: the state overflowed to NaN/Inf {where} with finite network outputs "
                                 "before it; check dt, lam and the noise (purify(check_finite=False) skips this check)")
            score, guidance = nets.drift_terms(state, t, lam)
            if not torch.isfinite(score).all():
                raise ValueError(f"score_model: returned NaN or Inf {where}; purify(check_finite=False) skips this check")
            if guidance is not None and not torch.isfinite(guidance).all():
                raise ValueError(f"classifier: its confidence gradient is NaN or Inf {where} (NaN/Inf logits, or an "
                                 "overflow in its backward); purify(check_finite=False) skips this check")
            return score, guidance

        with torch.no_grad():
            out = solve(x, self.config, self.stream, drift)
        where = "in the last step" if not torch.isfinite(out).all() else "on the first run only (a rerun was finite)"
        raise ValueError(f"noise: the purified state is NaN/Inf {where}; check dt, lam and the noise, and that the "
                         "networks are deterministic (purify(check_finite=False) skips this check)")

    def gradient(self, grad):
        raise ValueError("gradient: the backward pass gave NaN or Inf while the purification itself was finite: a "
                         "network's derivative is not finite (the score model's Jacobian, or the classifier's first "
                         "or second derivative in the guidance term); purify(check_finite=False) skips this check")

"""The VP-SDE and the guided reverse step: the maths every backend agrees on.

Conventions (docs/design.md §1): diffusion state x = 2u - 1 in [-1, 1], time t in [0, 1],
linear beta(t) = beta_min + t (beta_max - beta_min).  Purification integrates the
reverse-time SDE of Eq. 5 of the paper (arXiv 2408.05900) from t* down to 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_MIN = 0.1
BETA_MAX = 20.0


def vp_beta(t):
    """beta(t) = beta_min + t (beta_max - beta_min); float or tensor."""
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def vp_log_alpha(t):
    """log alpha(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min."""
    return -0.25 * t * t * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN


def vp_alpha(t):
    """Mean scale of the VP marginal: x_t = alpha(t) x_0 + sigma(t) eps."""
    return torch.exp(vp_log_alpha(t)) if torch.is_tensor(t) else math.exp(vp_log_alpha(t))


def vp_sigma(t):
    """Standard deviation of the VP marginal, sigma(t)^2 = 1 - alpha(t)^2."""
    if torch.is_tensor(t):
        return torch.sqrt(-torch.expm1(2.0 * vp_log_alpha(t)))
    return math.sqrt(-math.expm1(2.0 * vp_log_alpha(t)))


def vp_gamma(t):
    """gamma(t) = int_0^t beta(s)/2 ds, the quantity in Proposition 2 (Eq. 8)."""
    return -vp_log_alpha(t)


# DiffPure's forward diffusion (its runners/diffpure_sde.py) uses the discrete DDPM schedule of Ho et al.
# (2020), betas = linspace(beta_min / 1000, beta_max / 1000, 1000) = linspace(1e-4, 0.02, 1000),
# alpha_bar = cumprod(1 - betas), and diffuses to index 1000 t* - 1:
#     x = sqrt(alpha_bar[1000 t* - 1]) x0 + sqrt(1 - alpha_bar[1000 t* - 1]) eps.
# At t* = 0.1 that is mean scale 0.947110 / noise std 0.320908, against the continuous VP marginal's
# alpha(0.1) = 0.946722 / sigma(0.1) = 0.322053.  The reverse SDE itself is continuous in both.
DDPM_STEPS = 1000
DIFFUSION_SCHEDULES = ("ddpm", "vp")  # DiffPure's discrete marginal, or the continuous alpha(t), sigma(t)


def ddpm_alpha_bar(n_steps: int = DDPM_STEPS) -> torch.Tensor:
    """alpha_bar_i = prod_{j <= i} (1 - beta_j), betas = linspace(beta_min/n, beta_max/n, n); float64 (n,)."""
    betas = torch.linspace(BETA_MIN / n_steps, BETA_MAX / n_steps, n_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_index(t: float, n_steps: int = DDPM_STEPS) -> int:
    """The DDPM step count n_steps * t (DiffPure's `t`); t must sit on the 1/n_steps grid."""
    index = round(t * n_steps)
    if not 1 <= index <= n_steps or abs(index - t * n_steps) > 1e-6 * n_steps:
        raise ValueError(f"t_star: DiffPure's discrete schedule needs t* on the 1/{n_steps} grid in (0, 1], got {t!r} "
                         "(or use the continuous marginal, diffusion='vp')")
    return index


def diffusion_marginal(t: float, schedule: str = "ddpm") -> tuple[float, float]:
    """(mean scale, noise std) of the forward marginal at time t: 'ddpm' (DiffPure's discrete schedule,
    alpha_bar at index 1000 t - 1) or 'vp' (the continuous alpha(t), sigma(t))."""
    if schedule == "vp":
        return vp_alpha(t), vp_sigma(t)
    if schedule != "ddpm":
        raise ValueError(f"diffusion: expected one of {DIFFUSION_SCHEDULES}, got {schedule!r}")
    alpha_bar = float(ddpm_alpha_bar()[ddpm_index(t) - 1])
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


def diffuse(x0: torch.Tensor, t: float, eps: torch.Tensor, schedule: str = "ddpm") -> torch.Tensor:
    """Sample the forward marginal at time t, scale x0 + std eps (DiffPure's first stage; see
    `diffusion_marginal` for the two schedules)."""
    scale, std = diffusion_marginal(t, schedule)
    return scale * x0 + std * eps


@dataclass(frozen=True)
class ReverseGrid:
    """Time grid of the reverse Euler-Maruyama solve: t_k = t* - k h, k = 0..N-1.

    N = round(t*/dt) and h = t*/N, so the path ends exactly at t = 0
    (t* = 0.1, dt = 1e-3 gives N = 100, h = 1e-3).
    """

    t_star: float
    n_steps: int

    @classmethod
    def from_dt(cls, t_star: float, dt: float) -> "ReverseGrid":
        return cls(float(t_star), max(1, int(round(t_star / dt))))

    @property
    def h(self) -> float:
        return self.t_star / self.n_steps

    def t(self, k: int) -> float:
        return self.t_star - k * self.h

    def beta_dt(self, k: int) -> float:
        """beta(t_k) * h: the one coefficient the step and the adjoint need."""
        return vp_beta(self.t(k)) * self.h


def euler_maruyama_step(x, score, guidance, beta_dt: float, lam: float, z):
    """One guided reverse step (Eq. 5, Euler-Maruyama), the reference formula:

        x_{k+1} = x_k + beta_k h (x_k / 2 + s + lam g) + sqrt(beta_k h) z_k

    `guidance` may be None (lam = 0 or no classifier); `z` may be None (noise off).
    """
    drift = 0.5 * x + score
    if guidance is not None and lam != 0.0:
        drift = drift + lam * guidance
    out = x + beta_dt * drift
    if z is not None:
        out = out + math.sqrt(beta_dt) * z
    return out


def adjoint_step(a, vjp, beta_dt: float):
    """One step of the discrete adjoint (docs/design.md §3), the reference formula:

        a_k = a_{k+1} + beta_k h (a_{k+1} / 2 + J_s^T a_{k+1} + lam H a_{k+1})

    `vjp` is J_s^T a + lam H a, computed by autograd through the networks.
    """
    return a + beta_dt * (0.5 * a + vjp)

"""The VP-SDE and the guided reverse step: the maths every backend agrees on.

Conventions (see DESIGN.md): diffusion state x = 2u - 1 in [-1, 1], time t in [0, 1],
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


def diffuse(x0: torch.Tensor, t: float, eps: torch.Tensor) -> torch.Tensor:
    """Sample the forward VP marginal at time t: alpha(t) x0 + sigma(t) eps (DiffPure's first stage)."""
    return vp_alpha(t) * x0 + vp_sigma(t) * eps


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
    """One step of the discrete adjoint (DESIGN.md), the reference formula:

        a_k = a_{k+1} + beta_k h (a_{k+1} / 2 + J_s^T a_{k+1} + lam H a_{k+1})

    `vjp` is J_s^T a + lam H a, computed by autograd through the networks.
    """
    return a + beta_dt * (0.5 * a + vjp)

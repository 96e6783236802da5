"""Adapters that turn networks into score models (x, t) -> grad_x log p_t(x), x in [-1, 1]."""
from __future__ import annotations

import torch
from torch import nn

from .sde import vp_sigma


class EpsilonScore(nn.Module):
    """score(x, t) = -eps(x, time_scale * t) / sigma(t) for an epsilon-prediction network.

    time_scale=999 is Score SDE's continuous VP label (DDPM++/NCSN++ "cont." checkpoints);
    time_scale=1 passes t itself.  t: float tensor of shape (B,) or a scalar.
    """

    def __init__(self, eps_model, time_scale: float = 1.0):
        super().__init__()
        self.eps_model, self.time_scale = eps_model, float(time_scale)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        sigma = vp_sigma(t).reshape(-1, *([1] * (x.ndim - 1)))
        return -self.eps_model(x, self.time_scale * t) / sigma


def score_sde_continuous(eps_model) -> EpsilonScore:
    """Score SDE's continuous VP models take the time label 999 t and predict eps."""
    return EpsilonScore(eps_model, time_scale=999.0)

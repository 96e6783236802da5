"""Closed-form models for exact tests (and for users who want them).

`GaussianMixture` has the exact diffused score of the VP-SDE; `LinearSoftmaxClassifier` has
closed-form confidence gradients and Hessians.  Both work in float64 for gradcheck.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .sde import vp_alpha, vp_sigma


class GaussianMixture(nn.Module):
    """Data p_0(x) = sum_k w_k N(x; mu_k, s_k^2 I) in the diffusion space (flattened dimension D).

    Under the VP-SDE the marginal at time t is sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I),
    so the score is exact: forward(x, t) = grad_x log p_t(x), x of shape (B, ...) with B*... = B*D.
    """

    def __init__(self, means, stds, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            means = means[:, None]
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("means", means)  # (K, D)
        self.register_buffer("stds", stds)  # (K,)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    def _component_terms(self, x, t):
        """Per-component log w_k N_k(x) at time t and the variances; x (B, D)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
        alpha, sigma = vp_alpha(t), vp_sigma(t)
        var = alpha**2 * self.stds.to(x.dtype) ** 2 + sigma**2  # (B or 1, K)
        diff = x[:, None, :] - alpha[:, :, None] * self.means.to(x.dtype)  # (B, K, D)
        d = x.shape[1]
        log_n = -0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return self.log_weights.to(x.dtype) + log_n, diff, var

    def log_prob(self, x, t):
        """log p_t(x) for x (B, ...)."""
        logs, _, _ = self._component_terms(x.reshape(x.shape[0], -1), t)
        return torch.logsumexp(logs, dim=1)

    def forward(self, x, t):
        flat = x.reshape(x.shape[0], -1)
        logs, diff, var = self._component_terms(flat, t)
        resp = torch.softmax(logs, dim=1)  # (B, K) posterior over components
        score = -(resp[:, :, None] * diff / var[:, :, None]).sum(1)
        return score.reshape(x.shape)

    def sample(self, n, generator=None):
        """n samples from p_0 (float64, shape (n, D)) and their component labels."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps, k


class LinearSoftmaxClassifier(nn.Module):
    """logits = W flatten(u) + b on [0, 1] images u; closed-form guidance for tests."""

    def __init__(self, weight, bias=None):
        super().__init__()
        weight = torch.as_tensor(weight)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)  # (C, D)
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else torch.as_tensor(bias)
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, u):
        return u.reshape(u.shape[0], -1) @ self.weight.T + self.bias

    def confidence_grad(self, x):
        """grad_x log max_y p(y|(x+1)/2) = 1/2 W^T (e_y* - p), x in [-1, 1]."""
        logits = self((x + 1) * 0.5)
        p = torch.softmax(logits, -1)
        e = torch.nn.functional.one_hot(logits.argmax(-1), p.shape[-1]).to(p.dtype)
        return (0.5 * (e - p) @ self.weight).reshape(x.shape)

    def confidence_hessian(self, x):
        """Hessian of log max_y p wrt x: -1/4 W^T (diag p - p p^T) W, shape (B, D, D)."""
        p = torch.softmax(self((x + 1) * 0.5), -1)
        cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return -0.25 * self.weight.T @ cov @ self.weight

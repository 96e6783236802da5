"""Shared test problems: the analytic mixture + linear-softmax pair, and tiny neural nets."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from coup_fast.analytic import GaussianMixture, LinearSoftmaxClassifier
from coup_fast.score import EpsilonScore

# Triton kernels run on a GPU, or on CPU tensors under the interpreter (conftest.py sets it).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not TRITON_INTERPRETED else "cpu"
needs_triton_runtime = pytest.mark.skipif(
    not (TRITON_INTERPRETED or torch.cuda.is_available()),
    reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU-only machines)")


def analytic_problem(d: int = 6, n_classes: int = 4, dtype=torch.float32, seed: int = 0):
    """(score_model, classifier) with closed-form score, guidance and Hessian, in dimension d."""
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture(0.5 * torch.randn(3, d, generator=g, dtype=torch.float64), [0.3, 0.4, 0.5])
    clf = LinearSoftmaxClassifier(3.0 * torch.randn(n_classes, d, generator=g, dtype=torch.float64),
                                  torch.randn(n_classes, generator=g, dtype=torch.float64))
    return gmm, clf.to(dtype)


class TinyEpsNet(nn.Module):
    """A small epsilon-prediction conv net with a time input, for (B, C, H, W) states."""

    def __init__(self, channels: int = 1, width: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.time(t.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        return self.out(torch.tanh(h))


class TinyClassifier(nn.Module):
    """A small CNN classifier on [0, 1] images (smooth activations, so Hessians are non-trivial)."""

    def __init__(self, channels: int = 1, size: int = 4, n_classes: int = 5, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.fc = nn.Linear(width * size * size, n_classes)

    def forward(self, u):
        return self.fc(torch.tanh(self.conv(u)).flatten(1))


def neural_problem(dtype=torch.float32, seed: int = 0, channels: int = 1, size: int = 4):
    """(score_model, classifier): tiny random conv nets, the score through EpsilonScore."""
    torch.manual_seed(seed)
    score = EpsilonScore(TinyEpsNet(channels)).to(dtype).eval()
    clf = TinyClassifier(channels, size).to(dtype).eval()
    for p in list(score.parameters()) + list(clf.parameters()):
        p.requires_grad_(False)
    return score, clf


def step_noise(n_draws: int, shape, seed: int = 3, dtype=torch.float64) -> torch.Tensor:
    """n_draws seeded standard-normal tensors of `shape`, stacked: an explicit `noise=` for purify."""
    return torch.randn(n_draws, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def out_and_grad(fn, x, upstream):
    """(fn(x) detached, d<upstream, fn(x)>/dx) by plain autograd."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad


def float64_problem(kind: str):
    """(score, classifier, x) in float64: 'analytic' (d = 5, x (3, 5)) or 'neural' (x (2, 1, 4, 4)), x in [0.2, 0.8]
    (away from the clamp's bounds), the gradient tests' shared problem."""
    if kind == "analytic":
        score, clf = analytic_problem(d=5, dtype=torch.float64)
        shape = (3, 5)
    else:
        score, clf = neural_problem(dtype=torch.float64)
        shape = (2, 1, 4, 4)
    x = 0.2 + 0.6 * torch.rand(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return score, clf, x

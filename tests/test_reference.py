"""purify against the independent torchsde path, on the same Brownian path."""
import math

import pytest
import torch

from coup_fast import purify
from coup_fast.guidance import confidence_grad
from coup_fast.reference import (T_END, brownian_interval, noise_from_brownian, purify_published, purify_torchsde,
                                 torchsde_times)
from problems import analytic_problem, neural_problem

PROBLEMS = {"analytic": lambda: (analytic_problem(d=6), torch.rand(4, 6)),
            "neural": lambda: (neural_problem(), torch.rand(3, 1, 4, 4))}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("mode", ["coup", "reverse", "diffpure"])
def test_purify_matches_torchsde_on_one_brownian_interval(problem, mode):
    torch.manual_seed(0)
    (score, clf), x = PROBLEMS[problem]()
    bm = brownian_interval(x, 0.1, seed=5)
    noise = noise_from_brownian(bm, x.shape, 0.1)  # (100, *x.shape)
    assert noise.shape == (100, *x.shape) and abs(noise.std().item() - 1) < 0.1
    if mode == "diffpure":
        eps = torch.randn(1, *x.shape)
        ours = purify(x, score, clf, mode=mode, noise=torch.cat([eps, noise]))
        ref = purify_torchsde(x, score, clf, mode=mode, noise=eps, bm=bm)
    else:
        ours = purify(x, score, clf, mode=mode, noise=noise, lam=1.0)
        ref = purify_torchsde(x, score, clf, mode=mode, bm=bm, lam=1.0)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_torchsde_adjoint_with_hessian_approximates_the_exact_one():
    # The H-including torchsde reference: its uniform grid from t* to T_END makes forward and adjoint
    # visit the same times.  It approximates the exact discrete gradient, and more closely than a gradient
    # without the guidance's Hessian term: an adjoint that dropped it would fail here.
    score, clf = analytic_problem(d=4, dtype=torch.float64)
    x = (0.3 + 0.4 * torch.rand(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    noise = torch.randn(100, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = torch.arange(4.0, dtype=torch.float64)
    grads = {}
    for name, fn in (("exact", lambda v: purify(v, score, clf, noise=noise)),
                     ("detached-guidance", lambda v: purify(v, score, clf, noise=noise, gradient="detached-guidance")),
                     ("torchsde", lambda v: purify_torchsde(v, score, clf, noise=noise, t_end=T_END, adjoint=True))):
        xr = x.clone().requires_grad_(True)
        (grads[name],) = torch.autograd.grad((fn(xr) * w).sum(), xr)
    rel = {g: ((grads[g] - grads["exact"]).norm() / grads["exact"].norm()).item() for g in ("torchsde", "detached-guidance")}
    assert rel["torchsde"] < 0.02 and rel["torchsde"] < rel["detached-guidance"] / 2, rel


def test_torchsde_adjoint_refuses_an_end_time_of_zero():
    score, clf = analytic_problem(d=4)
    with pytest.raises(ValueError, match="^t_end:"):
        purify_torchsde(torch.rand(2, 4), score, clf, noise=torch.randn(100, 2, 4), adjoint=True)


class _CountingClassifier(torch.nn.Module):
    """A classifier that records the times its logits are differentiated once and twice (a double backward
    is what the lam H term of an adjoint needs)."""

    def __init__(self, clf):
        super().__init__()
        self.clf, self.calls = clf, {"backward": 0, "double_backward": 0}
        counts = self.calls

        class Probe(torch.autograd.Function):
            @staticmethod
            def forward(ctx, u):
                return u.view_as(u)

            @staticmethod
            def backward(ctx, g):
                counts["backward"] += 1
                return ProbeBackward.apply(g)

        class ProbeBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, g):
                return g.view_as(g)

            @staticmethod
            def backward(ctx, gg):
                counts["double_backward"] += 1
                return gg

        self.probe = Probe

    def forward(self, u):
        return self.clf(self.probe.apply(u))


class _TimeRecorder(torch.nn.Module):
    def __init__(self, score):
        super().__init__()
        self.score, self.times = score, []

    def forward(self, x, t):
        self.times.append((torch.is_grad_enabled() and x.requires_grad, float(t[0])))
        return self.score(x, t)


def test_published_attack_runs_the_official_grid_with_the_guidance_detached():
    # DiffPure's / COUP's code: ts = [1 - t*, 1 - 1e-5], Euler with dt: the forward evaluates the drift at
    # t* - k dt (k < N) and ends at 1e-5; torchsde's adjoint steps back from 1e-5 by dt; the guidance is
    # computed on x.detach(), so its logits are never differentiated twice (no lam H term).
    analytic_score, analytic_clf = analytic_problem(d=4, dtype=torch.float64)
    score, clf = _TimeRecorder(analytic_score), _CountingClassifier(analytic_clf)
    x = (0.3 + 0.4 * torch.rand(2, 4, dtype=torch.float64)).requires_grad_(True)
    t_star, dt = 0.1, 0.02
    out = purify(x, score, clf, t_star=t_star, dt=dt, gradient="adjoint", generator=torch.Generator().manual_seed(0))
    forward = [t for grad, t in score.times if not grad]  # (torchsde also evaluates f once to check shapes)
    assert forward == pytest.approx([t_star - k * dt for k in range(5)], abs=1e-12)
    score.times.clear()
    out.sum().backward()
    backward = [t for grad, t in score.times if grad]
    assert backward == pytest.approx([T_END + k * dt for k in range(5)], abs=1e-12)
    assert clf.calls["double_backward"] == 0 and x.grad is not None and x.grad.abs().sum() > 0
    # the exact gradient, for contrast, differentiates the guidance twice (lam H)
    clf.calls.update(backward=0, double_backward=0)
    xr = x.detach().clone().requires_grad_(True)
    purify(xr, analytic_score, clf, t_star=t_star, dt=dt, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert clf.calls["double_backward"] > 0


def test_published_forward_is_euler_on_the_official_grid():
    # A hand-written Euler loop over the official grid (steps dt, the last one ending at 1e-5) with the
    # same increments gives the published forward.
    from coup_fast.sde import vp_beta

    score, clf = analytic_problem(d=4, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(3, 4, dtype=torch.float64)
    t_star, dt, lam = 0.1, 0.02, 1.5
    noise = torch.randn(5, 3, 4, dtype=torch.float64)
    got = purify(x, score, clf, t_star=t_star, dt=dt, lam=lam, noise=noise, gradient="adjoint")
    state = 2 * x - 1
    times = [t_star - k * dt for k in range(5)] + [T_END]
    for k in range(5):
        t, step = times[k], times[k] - times[k + 1]
        g = confidence_grad(clf, state)
        drift = 0.5 * state + score(state, torch.full((3,), t, dtype=torch.float64)) + lam * g
        state = state + vp_beta(t) * step * drift + math.sqrt(vp_beta(t) * step) * noise[k]
    torch.testing.assert_close(got, ((state + 1) / 2).clamp(0, 1), rtol=1e-12, atol=1e-12)


def test_published_attack_equals_the_reference_path_on_the_same_brownian_motion():
    score, clf = neural_problem(torch.float64)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    bm = brownian_interval(x, 0.1, seed=3, t_end=T_END)
    grads = []
    for adjoint_params in ((), tuple(score.parameters()) + tuple(clf.parameters())):
        xr = x.clone().requires_grad_(True)
        ref = purify_published(xr, score, clf, t_star=0.1, dt=0.01, bm=bm, adjoint_params=adjoint_params)
        (g,) = torch.autograd.grad(ref.sum(), xr)
        grads.append(g)
    # the networks' parameters as extra adjoint states (the official cost) leave the input gradient alone
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # purify(gradient='adjoint') is this pipeline: on the same path the same forward; the same gradient up to
    # the path between grid points, which the adjoint queries (t = 1e-5 + k dt) and a path given as grid
    # increments (`noise`) snaps to the grid
    noise = noise_from_published(bm, x.shape, 0.1, 0.01)
    xr = x.clone().requires_grad_(True)
    out = purify(xr, score, clf, t_star=0.1, dt=0.01, noise=noise, gradient="adjoint")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), xr)
    assert ((g - grads[0]).norm() / grads[0].norm()).item() < 1e-3


def noise_from_published(bm, x_shape, t_star, dt):
    """The increments of a Brownian path on the official grid, as purify's `noise` (z_k = dW_k / sqrt(dtau_k))."""
    times = torchsde_times(t_star, T_END, dt)
    return torch.stack([bm(a, b) / math.sqrt(b - a) for a, b in zip(times[:-1], times[1:])]).reshape(-1, *x_shape)

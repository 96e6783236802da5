"""gradient='exact' (the discrete adjoint of _ExactSolve) against plain autograd through the loop.

reference.purify_unrolled keeps every step's graph; the adjoint keeps x_0..x_{N-1} and recomputes
one step at a time.  Both differentiate the same computation, so they agree to round-off (float64).
"""
import pytest
import torch

from coup_fast import purify
from coup_fast.noise import draw_seed
from coup_fast.reference import purify_unrolled
from coup_fast.sde import ReverseGrid
from problems import analytic_problem, float64_problem, out_and_grad, step_noise

F64 = torch.float64
T_STAR, DT, LAM = 0.02, 0.005, 2.0  # 4 steps: short enough for gradcheck, long enough to chain adjoint steps
MODES = ("coup", "reverse", "diffpure")


def _problem(kind):
    return float64_problem(kind)


def _noise(mode, shape, seed=3):
    return step_noise(round(T_STAR / DT) + (mode == "diffpure"), shape, seed=seed)


_grad = out_and_grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _two_steps_budget(score, clf, x):
    """A memory budget that keeps the first two of the 4 step graphs and recomputes the other two."""
    from coup_fast.adjoint import KeptStep
    from coup_fast.networks import EagerNetworks

    step = KeptStep.record_exact(2 * x - 1, T_STAR, EagerNetworks(score, clf), LAM, True).graph_bytes()
    return 3 * step + 4 * x.numel() * x.element_size()


@pytest.mark.parametrize("kind", ["analytic", "neural"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gradient", ["exact", "detached-guidance"])
@pytest.mark.parametrize("memory", ["auto", "lean", "fast", "two-steps"])
def test_adjoint_equals_unrolled_autograd(kind, mode, gradient, memory):
    score, clf, x = _problem(kind)
    noise = _noise(mode, x.shape)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    if memory == "two-steps":
        memory = _two_steps_budget(score, clf, x)
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode=mode, noise=noise, gradient=gradient)
    out, grad = _grad(lambda v: purify(v, score, clf, memory=memory, **kw), x, upstream)
    ref_out, ref_grad = _grad(lambda v: purify_unrolled(v, score, clf, **kw), x, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert _rel(grad, ref_grad) <= 1e-8


@pytest.mark.parametrize("kind", ["analytic", "neural"])
def test_seeded_fused_path_equals_unrolled(kind):
    """noise=None: the forward runs the fused em_step, the backward the fused adjoint_update."""
    score, clf, x = _problem(kind)
    seed = draw_seed(torch.Generator().manual_seed(5))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode="coup")
    out, grad = _grad(lambda v: purify(v, score, clf, generator=torch.Generator().manual_seed(5), **kw), x, upstream)
    ref_out, ref_grad = _grad(lambda v: purify_unrolled(v, score, clf, seed=seed, **kw), x, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert _rel(grad, ref_grad) <= 1e-8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("memory", ["lean", "two-steps"])
def test_gradcheck_neural_models(mode, memory):
    score, clf, x = _problem("neural")
    x = x[:1].clone().requires_grad_(True)
    noise = _noise(mode, x.shape)
    if memory == "two-steps":
        memory = _two_steps_budget(score, clf, x.detach())
    fn = lambda v: purify(v, score, clf, t_star=T_STAR, dt=DT, lam=LAM, mode=mode, noise=noise,  # noqa: E731
                          memory=memory)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_analytic_models_seeded():
    score, clf, x = _problem("analytic")
    x = x.clone().requires_grad_(True)
    # A fresh generator per call: the same seed, so the same noise, on every gradcheck evaluation.
    def fn(v):
        return purify(v, score, clf, t_star=T_STAR, dt=DT, lam=LAM, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_exact_and_detached_jacobians_match_closed_form_products():
    """A 3-step noiseless run: d x_N / d x_0 = prod_k [(1 + b_k/2) I + b_k (J_s(x_k) + lam H(x_k))].

    H is LinearSoftmaxClassifier.confidence_hessian (closed form); 'detached-guidance' is the same
    product without lam H, the term the paper's code drops."""
    score, clf = analytic_problem(d=4, dtype=F64)
    lam, t_star, dt = 4.0, 0.03, 0.01
    grid = ReverseGrid.from_dt(t_star, dt)
    u0 = 0.5 + 0.05 * torch.randn(1, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    noise = torch.zeros(grid.n_steps, 1, 4, dtype=F64)

    def jac(gradient):
        def fn(v):
            return purify(v, score, clf, t_star=t_star, dt=dt, lam=lam, noise=noise, gradient=gradient)

        return torch.autograd.functional.jacobian(fn, u0).reshape(4, 4)

    states, x = [], 2 * u0 - 1
    for k in range(grid.n_steps):  # the forward path, to evaluate J_s and H on it
        states.append(x)
        b = grid.beta_dt(k)
        x = x + b * (0.5 * x + score(x, torch.full((1,), grid.t(k), dtype=F64)) + lam * clf.confidence_grad(x))
    assert (0 < (x + 1) / 2).all() and ((x + 1) / 2 < 1).all()  # no clamping at the end
    products = {"exact": torch.eye(4, dtype=F64), "detached-guidance": torch.eye(4, dtype=F64)}
    for k, x_k in enumerate(states):
        b = grid.beta_dt(k)
        t = torch.full((1,), grid.t(k), dtype=F64)
        j_s = torch.autograd.functional.jacobian(lambda v: score(v, t), x_k).reshape(4, 4)
        step = (1 + 0.5 * b) * torch.eye(4, dtype=F64) + b * j_s
        products["detached-guidance"] = step @ products["detached-guidance"]
        products["exact"] = (step + b * lam * clf.confidence_hessian(x_k)[0]) @ products["exact"]
    # Images u = (x + 1)/2 on both ends: the chain rule factors 2 and 1/2 cancel.
    for gradient, want in products.items():
        torch.testing.assert_close(jac(gradient), want, rtol=1e-9, atol=1e-12)
    gap = (products["exact"] - products["detached-guidance"]).abs().max().item()
    assert gap > 1e-3  # the lam H term matters here

"""purify(states=...): intermediate diffusion states as differentiable outputs, the discrete adjoint adding each
state's incoming gradient at its step (docs/design.md §3, per-step losses), against plain autograd through an
unrolled loop written out here (float64, every memory setting)."""
import pytest
import torch

from coup_fast import PurifiedClassifier, purify
from coup_fast.networks import drift_terms
from coup_fast.sde import ReverseGrid, diffuse, euler_maruyama_step
from problems import float64_problem, step_noise

F64 = torch.float64
T_STAR, DT, LAM = 0.02, 0.005, 2.0  # N = 4 steps
N = 4


def _problem(kind):
    return float64_problem(kind)


def unrolled(u, score, clf, *, mode, noise, ks, detach_guidance=False):
    """The pipeline and the Euler-Maruyama loop with every step on the autograd tape: (images, states)."""
    grid = ReverseGrid.from_dt(T_STAR, DT)
    lam = LAM if mode == "coup" else 0.0
    x = 2 * u - 1
    if mode == "diffpure":
        x, noise = diffuse(x, T_STAR, noise[0], "ddpm"), noise[1:]
    states = [x]
    for k in range(grid.n_steps):
        s, g = drift_terms(x, grid.t(k), score, clf, lam, create_graph=not detach_guidance)
        if detach_guidance and g is not None:
            g = g.detach()
        x = euler_maruyama_step(x, s, g, grid.beta_dt(k), lam, noise[k])
        states.append(x)
    return ((x + 1) / 2).clamp(0, 1), torch.stack([states[k] for k in ks])


def _loss(images, states, weights):
    """A linear term on the images and, per state, a linear and a quadratic term: every cotangent differs."""
    w, c = weights
    return (w * images).sum() + (c * states).sum() + 0.5 * (states ** 2).sum()


def _grad(fn, x, weights):
    xr = x.clone().requires_grad_(True)
    images, states = fn(xr)
    (g,) = torch.autograd.grad(_loss(images, states, weights), xr)
    return images.detach(), states.detach(), g


def _budget(score, clf, x):
    """A memory budget that keeps the first two of the 4 step graphs and recomputes the other two."""
    from coup_fast.adjoint import KeptStep
    from coup_fast.networks import EagerNetworks

    step = KeptStep.record_exact(2 * x - 1, T_STAR, EagerNetworks(score, clf), LAM, True).graph_bytes()
    return 3 * step + 4 * x.numel() * x.element_size()


@pytest.mark.parametrize("kind", ["analytic", "neural"])
@pytest.mark.parametrize("mode", ["coup", "reverse", "diffpure"])
@pytest.mark.parametrize("memory", ["lean", "fast", "two-steps", "auto"])
@pytest.mark.parametrize("ks", [(0, 2, 4), (3, 1)], ids=["first-mid-last", "unordered-inner"])
def test_per_step_loss_gradient_equals_unrolled_autograd(kind, mode, memory, ks):
    score, clf, x = _problem(kind)
    noise = step_noise(N + (mode == "diffpure"), x.shape)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(x.shape, generator=g, dtype=F64), torch.randn(len(ks), *x.shape, generator=g, dtype=F64))
    memory = _budget(score, clf, x) if memory == "two-steps" else memory
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode=mode, noise=noise)
    images, states, grad = _grad(lambda v: purify(v, score, clf, memory=memory, states=ks, **kw), x, weights)
    ref_images, ref_states, ref_grad = _grad(lambda v: unrolled(v, score, clf, mode=mode, noise=noise, ks=ks), x,
                                             weights)
    torch.testing.assert_close(images, ref_images, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states, ref_states, rtol=1e-12, atol=1e-12)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-10


def test_detached_guidance_states_gradient_equals_unrolled():
    score, clf, x = _problem("neural")
    noise = step_noise(N, x.shape)
    weights = (torch.ones(x.shape, dtype=F64), torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(2),
                                                           dtype=F64))
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode="coup", noise=noise)
    _, _, grad = _grad(lambda v: purify(v, score, clf, gradient="detached-guidance", states=(1, 4), **kw), x, weights)
    _, _, ref = _grad(lambda v: unrolled(v, score, clf, mode="coup", noise=noise, ks=(1, 4), detach_guidance=True),
                      x, weights)
    assert ((grad - ref).norm() / ref.norm()).item() <= 1e-10


def test_states_without_gradient_and_with_samples_are_the_same_states():
    score, clf, x = _problem("neural")
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode="diffpure")
    with torch.no_grad():
        plain, states = purify(x, score, clf, generator=torch.Generator().manual_seed(3), samples=2, states=(0, 4),
                               **kw)
    xr = x.clone().requires_grad_(True)
    images, graded = purify(xr, score, clf, generator=torch.Generator().manual_seed(3), samples=2, states=(0, 4), **kw)
    assert states.shape == (2, 2 * x.shape[0], *x.shape[1:])
    torch.testing.assert_close(graded.detach(), states, rtol=0, atol=0)
    torch.testing.assert_close(images.detach(), plain, rtol=0, atol=0)
    torch.testing.assert_close(((states[1] + 1) / 2).clamp(0, 1), plain, rtol=0, atol=0)  # x_N is the output


def test_bpda_states_are_straight_through():
    score, clf, x = _problem("neural")
    xr = x.clone().requires_grad_(True)
    _, states = purify(xr, score, clf, t_star=T_STAR, dt=DT, mode="diffpure", gradient="bpda", states=(0, 2),
                       generator=torch.Generator().manual_seed(0))
    c = torch.randn(states.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    (g,) = torch.autograd.grad((c * states).sum(), xr)
    torch.testing.assert_close(g, 2 * c.sum(0), rtol=1e-14, atol=0)  # d(2u - 1)/du = 2 for each state


def test_purified_classifier_returns_states():
    score, clf, x = _problem("neural")
    model = PurifiedClassifier(score, clf, t_star=T_STAR, dt=DT, mode="reverse")
    images, states = model.purify(x, samples=3, states=[4])
    assert images.shape == (3 * x.shape[0], *x.shape[1:]) and states.shape == (1, *images.shape)
    with pytest.raises(ValueError, match="states"):
        PurifiedClassifier(score, clf, states=(1,))  # not a constructor setting: it changes what a call returns


@pytest.mark.parametrize("states,kw", [((5,), {}), ((-1,), {}), ((1, 1), {}), ((), {}), ("1", {}), ((1.0,), {}),
                                       ((1,), {"gradient": "adjoint"}),
                                       ((1,), {"mode": "likelihood-max"})])
def test_bad_states_are_refused_naming_states(states, kw):
    score, clf, x = _problem("neural")
    with pytest.raises(ValueError, match="^states:"):
        purify(x, score, clf, t_star=T_STAR, dt=DT, states=states, **kw)


@pytest.mark.slow
def test_compile_engine_takes_states():
    """engine='compile' runs the same adjoint.exact_solve: the per-step gradient as unrolled autograd (~10 s of
    compiling)."""
    score, clf, x = _problem("neural")
    noise = step_noise(N, x.shape)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(x.shape, generator=g, dtype=F64), torch.randn(2, *x.shape, generator=g, dtype=F64))
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode="coup", noise=noise)
    _, _, grad = _grad(lambda v: purify(v, score, clf, engine="compile", memory="lean", states=(1, 4), **kw), x,
                       weights)
    _, _, ref = _grad(lambda v: unrolled(v, score, clf, mode="coup", noise=noise, ks=(1, 4)), x, weights)
    assert ((grad - ref).norm() / ref.norm()).item() <= 1e-10

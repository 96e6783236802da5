import importlib
import math

import numpy as np

import pytest
import torch

import coup_fast
from coup_fast import PurifiedClassifier, purify
from coup_fast.analytic import GaussianMixture, LinearSoftmaxClassifier
from coup_fast.noise import philox_normal
from coup_fast.sde import ReverseGrid
from problems import analytic_problem, neural_problem, out_and_grad


@pytest.fixture
def analytic():
    return analytic_problem(d=6)


def _x(b=4, d=6, dtype=torch.float32):
    return torch.rand(b, d, generator=torch.Generator().manual_seed(1), dtype=dtype)


BAD_INPUTS = [
    (dict(x=torch.full((2, 6), float("nan"))), "x"),
    (dict(x=torch.full((2, 6), float("inf"))), "x"),
    (dict(x=torch.rand(6)), "x"),
    (dict(x=torch.rand(1, 2, 6)), "x"),
    (dict(x=torch.ones(2, 6, dtype=torch.int64)), "x"),
    (dict(x=torch.rand(2, 6).half()), "x"),
    (dict(x=torch.rand(2, 6).bfloat16()), "x"),
    (dict(x=torch.rand(2, 6) + 0.5), "x"),
    (dict(x=torch.rand(2, 6) - 0.5), "x"),
    (dict(t_star=0.0), "t_star"),
    (dict(t_star=1.5), "t_star"),
    (dict(dt=0.0), "dt"),
    (dict(dt=0.2), "dt"),
    (dict(lam=-1.0), "lam"),
    (dict(lam=float("nan")), "lam"),
    (dict(lam=True), "lam"),
    (dict(dt=True), "dt"),
    (dict(t_star=True), "t_star"),
    (dict(generator=42), "generator"),
    (dict(mode="forward"), "mode"),
    (dict(gradient="fancy"), "gradient"),
    (dict(noise=torch.zeros(99, 2, 6)), "noise"),
    (dict(noise=torch.zeros(100, 2, 6), mode="diffpure"), "noise"),
    (dict(noise=torch.zeros(100, 2, 6, dtype=torch.int64)), "noise"),
]


@pytest.mark.parametrize("kwargs,name", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(analytic, kwargs, name):
    score, clf = analytic
    args = dict(x=torch.rand(2, 6), t_star=0.1, dt=1e-3, lam=1.0, mode="coup", gradient="exact", noise=None)
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(ValueError, match=rf"^{name}:"):
        purify(x, score, clf, **args)


def test_models_on_another_device_are_rejected(analytic):
    score, _ = analytic
    meta_clf = LinearSoftmaxClassifier(torch.zeros(3, 6)).to("meta")
    with pytest.raises(ValueError, match="^classifier:.*meta"):
        purify(torch.rand(2, 6), score, meta_clf)


def test_guidance_without_classifier_is_rejected(analytic):
    with pytest.raises(ValueError, match="^classifier:"):
        purify(torch.rand(2, 6), analytic[0], None, lam=1.0)
    out = purify(torch.rand(2, 6), analytic[0], None, mode="reverse")  # no guidance: fine
    assert out.shape == (2, 6)


def test_output_shape_range_and_seed_reproducibility(analytic):
    score, clf = analytic
    x = _x()
    a = purify(x, score, clf, generator=torch.Generator().manual_seed(3))
    b = purify(x, score, clf, generator=torch.Generator().manual_seed(3))
    c = purify(x, score, clf, generator=torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(11)
    d = purify(x, score, clf)
    torch.manual_seed(11)
    assert torch.equal(d, purify(x, score, clf))


def test_seeded_noise_is_the_counter_stream(analytic):
    # The seed path must use z_k = philox_normal(seed, k): replaying it as an explicit noise
    # tensor (pure torch) gives the same result as the fused ops.
    score, clf = analytic
    x = _x()
    seed = coup_fast.noise.draw_seed(torch.Generator().manual_seed(8))
    fused = purify(x, score, clf, generator=torch.Generator().manual_seed(8))
    noise = torch.stack([philox_normal(seed, k, x.shape) for k in range(100)])
    assert (fused - purify(x, score, clf, noise=noise)).abs().max() < 1e-5


def test_image_batches_and_neural_models():
    score, clf = neural_problem()
    x = torch.rand(3, 1, 4, 4)
    out = purify(x, score, clf, t_star=0.05, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_exact_gradient_passes_gradcheck_on_analytic_models():
    score, clf = analytic_problem(d=3, dtype=torch.float64)
    x = (0.25 + 0.5 * torch.rand(2, 3, dtype=torch.float64)).requires_grad_()
    noise = 0.1 * torch.randn(4, 2, 3, dtype=torch.float64)
    for mode in ("coup", "reverse"):
        fn = lambda v: purify(v, score, clf, t_star=0.02, dt=0.005, lam=2.0, mode=mode, noise=noise)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    noise_dp = 0.1 * torch.randn(5, 2, 3, dtype=torch.float64)
    fn = lambda v: purify(v, score, clf, t_star=0.02, dt=0.005, mode="diffpure", noise=noise_dp)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_detached_guidance_misses_exactly_the_lambda_hessian_term():
    # One step, no noise, interior point: d out / d x = (1 + bdt/2) I + bdt (J_s + lam H) for the
    # exact gradient; the paper's detached guidance drops bdt lam H (closed form for the linear classifier).
    score, clf = analytic_problem(d=4, dtype=torch.float64)
    x = torch.full((1, 4), 0.5, dtype=torch.float64) + 0.05 * torch.randn(1, 4, dtype=torch.float64)
    lam, t_star = 3.0, 0.01
    noise = torch.zeros(1, 1, 4, dtype=torch.float64)

    def jac(gradient):
        return torch.autograd.functional.jacobian(
            lambda v: purify(v, score, clf, t_star=t_star, dt=t_star, lam=lam, noise=noise, gradient=gradient), x
        ).reshape(4, 4)

    diff = jac("exact") - jac("detached-guidance")
    bdt = ReverseGrid.from_dt(t_star, t_star).beta_dt(0)
    expected = bdt * lam * clf.confidence_hessian(2 * x - 1)[0]
    assert expected.abs().max() > 1e-4  # the term matters here
    assert torch.allclose(diff, expected, atol=1e-12, rtol=1e-9)


def test_bpda_is_straight_through(analytic):
    score, clf = analytic
    x = _x().requires_grad_()
    out = purify(x, score, clf, gradient="bpda", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the forward is the purification itself
        torch.testing.assert_close(out, purify(x, score, clf, generator=torch.Generator().manual_seed(0)))
    (g,) = torch.autograd.grad(out.sum(), x)
    inside = (out > 0) & (out < 1)
    assert torch.equal(g[inside], torch.ones_like(g[inside]))


def test_guidance_lowers_label_flips_on_two_gaussians():
    # 1-D mixture N(-0.5, 1) (y=0) / N(0.5, 1) (y=1) in the diffusion space; the Bayes classifier's
    # logits are (-x/2, x/2), i.e. linear in u = (x + 1)/2.  Start at x = 0.2 (u = 0.6), t* = 0.1.
    gmm = GaussianMixture(torch.tensor([[-0.5], [0.5]]), [1.0, 1.0])
    clf = LinearSoftmaxClassifier(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.5, -0.5]))
    n = 20_000
    x = torch.full((n, 1), 0.6)
    flips = {}
    for lam in (0.0, 2.0):
        out = purify(x, gmm, clf, lam=lam, generator=torch.Generator().manual_seed(0))
        flips[lam] = (out < 0.5).double().mean().item()
    se = math.sqrt(flips[0.0] * (1 - flips[0.0]) / n)
    assert flips[2.0] < flips[0.0] - 4 * se, flips


def test_purified_classifier_is_a_differentiable_module(analytic):
    score, clf = analytic
    model = PurifiedClassifier(score, clf, t_star=0.02)
    x = _x().requires_grad_()
    logits = model(x)
    assert logits.shape == (4, clf.weight.shape[0])
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long)), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="^gradient:"):
        PurifiedClassifier(score, clf, gradient="nope")


@pytest.mark.parametrize("mode", ["coup", "reverse", "diffpure"])
@pytest.mark.parametrize("gradient", ["exact", "detached-guidance"])
def test_fast_memory_mode_gives_the_unrolled_gradient(mode, gradient):
    # memory='fast' keeps each step's graph instead of recomputing it: same gradient as plain
    # autograd through the unrolled loop.
    from coup_fast.reference import purify_unrolled

    score, clf = neural_problem(torch.float64)
    x = (0.2 + 0.6 * torch.rand(2, 1, 4, 4, dtype=torch.float64)).requires_grad_()
    noise = torch.randn(6 + (mode == "diffpure"), 2, 1, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    kw = dict(t_star=0.03, dt=0.005, lam=2.0, mode=mode, noise=noise, gradient=gradient)
    (fast,) = torch.autograd.grad((purify(x, score, clf, memory="fast", **kw) * w).sum(), x)
    (ref,) = torch.autograd.grad((purify_unrolled(x, score, clf, **kw) * w).sum(), x)
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-8


@pytest.mark.parametrize("memory", ["huge", "-1MiB", "0%", "150%", "2 parsecs", -1, 1.5, True, None])
def test_memory_mode_is_validated(analytic, memory):
    with pytest.raises(ValueError, match="^memory:"):
        purify(_x(), *analytic, memory=memory)
    with pytest.raises(ValueError, match="^memory:"):
        PurifiedClassifier(*analytic, memory=memory)


@pytest.mark.parametrize("memory,want", [("auto", "auto"), ("lean", "lean"), ("fast", "fast"), (0, 0), (4096, 4096),
                                         ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 GiB", int(1.5 * 2**30)),
                                         ("64k", 64 * 2**10), ("40%", 0.4), ("100 %", 1.0), ("1000", 1000)])
def test_memory_budgets_are_parsed(memory, want):
    from coup_fast.adjoint import check_memory

    assert check_memory(memory) == want


def _digits_problem(batch=3):
    """The shipped digits models (SiLU networks: a create_graph backward rounds differently from the plain
    one there) and a batch of test digits."""
    from coup_fast.data import load_digits
    from coup_fast.models import load_digits_models

    score, clf = load_digits_models()
    for p in list(score.parameters()) + list(clf.parameters()):
        p.requires_grad_(False)
    x, y = load_digits("test", n=batch, seed=1)
    return score, clf, x, y


def _bits(score, clf, x, y, **kw):
    xr = x.clone().requires_grad_(True)
    out = purify(xr, score, clf, generator=torch.Generator().manual_seed(3), **kw)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(clf(out), y), xr)
    return out.detach(), grad


def _step_bytes(score, clf, x, lam=1.0):
    """The bytes one kept step graph of these models holds at x's batch (what a memory budget is counted in)."""
    from coup_fast.adjoint import KeptStep
    from coup_fast.networks import EagerNetworks

    return KeptStep.record_exact(2 * x - 1, 0.01, EagerNetworks(score, clf), lam, True).graph_bytes()


@pytest.mark.parametrize("mode,gradient", [("coup", "exact"), ("coup", "detached-guidance"), ("diffpure", "exact")])
def test_memory_budgets_give_the_lean_gradient_bitwise(mode, gradient):
    """Every budget, from none to every step kept, gives bitwise memory='lean''s output and gradient (the
    default before the budget): a kept step drifts with the plain backward's guidance, as a recomputed one."""
    score, clf, x, y = _digits_problem()
    kw = dict(t_star=0.02, dt=0.004, mode=mode, gradient=gradient)  # 5 steps
    step = _step_bytes(score, clf, x)
    out, grad = _bits(score, clf, x, y, memory="lean", **kw)
    for memory in ("auto", "50%", 0, 1, int(2.5 * step), 10 * step, f"{10 * step}B"):
        got_out, got_grad = _bits(score, clf, x, y, memory=memory, **kw)
        assert torch.equal(got_out, out) and torch.equal(got_grad, grad), memory


def test_memory_budget_keeps_the_step_graphs_that_fit():
    """The forward keeps the first K step graphs, K as many as fit with the other steps' states and one
    recomputed graph; what it holds at the end of the forward stays under the budget."""
    from coup_fast import adjoint
    from coup_fast.networks import EagerNetworks
    from coup_fast.sde import ReverseGrid
    from coup_fast.solver import NoiseStream, PurifyConfig

    score, clf, x, _ = _digits_problem(batch=4)
    config = PurifyConfig(ReverseGrid.from_dt(0.01, 1e-3), 1.0, "coup")  # N = 10
    state = (2 * x - 1).requires_grad_(True)
    step, state_bytes = _step_bytes(score, clf, x), state.numel() * state.element_size()

    def forward(memory):
        out = adjoint.exact_solve(state, EagerNetworks(score, clf), config, NoiseStream(state, config, seed=5),
                                  memory=memory)
        return out, out.grad_fn  # ExactSolve's backward node is its ctx

    for budget, kept in ((0, 0), (1, 0), (10 * step, 10), (None, 10), (4 * step + 10 * state_bytes, 3),
                         (int(6.5 * step), 5)):
        out, ctx = forward("fast" if budget is None else budget)
        assert ctx.kept_steps == kept, budget
        if budget not in (None, 0):
            assert ctx.step_bytes == step
            steps = ctx.steps if kept else [None] * 10
            held = adjoint.graph_bytes(*[t for s in steps if s is not None for t in (s.x, s.score, s.guidance)])
            stored = sum(s is None for s in steps) * state_bytes
            if budget >= 10 * state_bytes + step:  # below what 'lean' needs, it runs 'lean'
                assert held + stored + (step if kept < 10 else 0) <= budget
        del out, ctx
    assert adjoint.plan_kept_steps(10, step, state_bytes, 10 * step - 1) == 8  # one graph's room for the recompute


def test_memory_auto_is_a_share_of_free_memory(monkeypatch):
    from coup_fast import adjoint

    monkeypatch.setattr(adjoint, "free_memory", lambda device: 1000)
    assert adjoint.memory_budget("auto", "cpu") == int(adjoint.AUTO_FRACTION * 1000)
    assert adjoint.memory_budget("40%", "cpu") == 400
    assert adjoint.memory_budget("lean", "cpu") == 0 and adjoint.memory_budget("fast", "cpu") is None
    assert adjoint.free_memory.__module__ and adjoint.memory_budget(123, "cpu") == 123
    monkeypatch.undo()
    assert 0 < adjoint.free_memory("cpu") < 2**50


_RSS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from benchmarks import _harness
from coup_fast import purify
from coup_fast.models import load_digits_models
if _harness.reset_peak_rss() is None:
    print("skip"); sys.exit()
score, clf = load_digits_models()
for p in list(score.parameters()) + list(clf.parameters()):
    p.requires_grad_(False)
x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
def grad(memory):
    xr = x.clone().requires_grad_(True)
    torch.autograd.grad(purify(xr, score, clf, t_star=0.03, memory=memory).sum(), xr)
grad("lean")  # the libraries' one-time set-up
print(*[_harness.peak_growth(lambda m=m: grad(m), trim=True) / 2**20 for m in ("lean", "fast", "64MiB")])
"""


def test_memory_budget_bounds_the_resident_set():
    """End to end, in a fresh process: the peak resident set of one gradient stays near the budget (64 MiB),
    where keeping every graph (memory='fast', N = 30 steps of ~8.6 MiB at batch 32) takes about 4x that."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.strip() == "skip":
        pytest.skip("no resettable peak-RSS mark on this OS")
    lean, fast, budget = map(float, proc.stdout.split())
    assert fast > 200 and lean < 48
    assert budget <= 64 + 24  # the budget, plus allocator slack and the step being computed


def test_numpy_scalars_are_numbers(analytic):
    np = pytest.importorskip("numpy")
    kw = dict(generator=torch.Generator().manual_seed(0))
    ref = purify(_x(), *analytic, t_star=0.02, dt=0.005, lam=0.5, **kw)
    kw = dict(generator=torch.Generator().manual_seed(0))
    got = purify(_x(), *analytic, t_star=np.float32(0.02), dt=np.float64(0.005), lam=np.float32(0.5), **kw)
    assert torch.allclose(got, ref, atol=1e-6)


def test_dt_that_does_not_divide_t_star_warns(analytic):
    with pytest.warns(UserWarning, match="does not divide t_star"):
        purify(_x(), *analytic, t_star=0.1, dt=0.067)


@pytest.mark.parametrize("reshape", [lambda l: l[:, 0], lambda l: l[..., None]])
def test_logits_of_another_shape_are_rejected(analytic, reshape):
    # (B,) or (B, C, 1) logits would reduce over the batch or a size-1 axis without any error
    score, clf = analytic
    bad = lambda u: reshape(clf(u))  # noqa: E731
    with pytest.raises(ValueError, match=r"^classifier: expected logits of shape \(B, C\)"):
        purify(_x(), score, bad)


@pytest.mark.parametrize("noise", [False, True])  # the fused C++ step, and the pure-torch one
def test_score_of_another_shape_is_rejected(analytic, noise):
    score, clf = analytic
    bad = lambda x, t: score(x, t)[:1]  # noqa: E731  (broadcastable: would pass silently)
    kw = dict(noise=torch.zeros(20, 4, 6)) if noise else {}
    with pytest.raises(ValueError, match="^score_model: expected a score of x's shape"):
        purify(_x(), bad, clf, t_star=0.02, **kw)


def test_inference_mode_with_guidance_is_a_clear_error(analytic):
    with torch.inference_mode():
        with pytest.raises(ValueError, match="^lam:.*inference_mode"):
            purify(_x(), *analytic)
        assert purify(_x(), *analytic, mode="reverse", t_star=0.01).shape == (4, 6)  # no guidance: fine


def test_models_in_training_mode_warn():
    score, clf = neural_problem()
    clf_train = torch.nn.Sequential(clf, torch.nn.Dropout(0.1)).train()
    x = torch.rand(2, 1, 4, 4)
    with pytest.warns(UserWarning, match=r"classifier has dropout.*classifier\.eval\(\)"):
        purify(x, score, clf_train, t_star=0.01)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        purify(x, score, clf_train.eval(), t_star=0.01)
        purify(x, score, clf.train(), t_star=0.01)  # no mode-dependent layers: nothing to warn about


@pytest.mark.parametrize("gradient", ["exact", "adjoint", "detached-guidance", "bpda"])
def test_gradients_leave_model_parameters_alone(gradient):
    score, clf = neural_problem()
    params = list(score.parameters()) + list(clf.parameters())
    for p in params:
        p.requires_grad_(True)
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    purify(x, score, clf, t_star=0.01, gradient=gradient).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in params)


def test_fast_memory_mode_allows_a_second_backward():
    # the kept graphs are freed by the first backward; a retained second one recomputes them
    score, clf = neural_problem(torch.float64)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    noise = torch.randn(4, 2, 1, 4, 4, dtype=torch.float64)
    grads = {}
    for memory in ("lean", "fast"):
        xr = x.clone().requires_grad_(True)
        out = purify(xr, score, clf, t_star=0.02, dt=0.005, noise=noise, memory=memory)
        out.sum().backward(retain_graph=True)
        first = xr.grad.clone()
        out.sum().backward()
        assert torch.allclose(xr.grad, 2 * first, rtol=1e-12, atol=0)
        grads[memory] = first
    assert torch.allclose(grads["fast"], grads["lean"], rtol=1e-10, atol=0)


def test_unrolled_reference_uses_purifys_noise_counters(analytic):
    # seeded purify and purify_unrolled(seed) draw the same z for the same counters, DiffPure included
    from coup_fast.noise import draw_seed
    from coup_fast.reference import purify_unrolled

    x = _x()
    for mode in ("coup", "diffpure"):
        seed = draw_seed(torch.Generator().manual_seed(5))
        got = purify(x, *analytic, t_star=0.02, mode=mode, generator=torch.Generator().manual_seed(5))
        ref = purify_unrolled(x, *analytic, t_star=0.02, mode=mode, seed=seed)
        assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("diffusion", ["ddpm", "vp"])
def test_diffpure_diffuses_with_the_chosen_marginal(diffusion):
    # One step (t* = dt = 0.001), a zero score, no step noise: the output is the diffused state after one
    # drift step, x_d (1 + beta h / 2), with x_d from DiffPure's discrete schedule (written out with numpy)
    # or from the continuous VP marginal.
    zero_score = lambda x, t: torch.zeros_like(x)  # noqa: E731
    u = torch.rand(3, 6, dtype=torch.float64)
    eps = torch.randn(3, 6, dtype=torch.float64)
    noise = torch.stack([eps, torch.zeros_like(eps)])
    out = purify(u, zero_score, None, mode="diffpure", t_star=1e-3, dt=1e-3, noise=noise, diffusion=diffusion)
    if diffusion == "ddpm":
        a0 = 1.0 - 0.1 / 1000  # alpha_bar[0] = 1 - beta_0
        scale, std = math.sqrt(a0), math.sqrt(1.0 - a0)
    else:
        scale, std = coup_fast.sde.vp_alpha(1e-3), coup_fast.sde.vp_sigma(1e-3)
    x_d = scale * (2 * u - 1) + std * eps
    expected = (x_d * (1 + 0.5 * ReverseGrid.from_dt(1e-3, 1e-3).beta_dt(0)) + 1) / 2  # unclamped, as NVlabs' code
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _nvlabs_diffpure(u, score, noise, t_star, dt):
    """NVlabs DiffPure's purified image, written here from its definition (eval_sde_adv.py's SDE_Adv_Model and
    runners/diffpure_sde.py): x = 2u - 1 diffused with the discrete DDPM alpha_bar at index 1000 t* - 1 and draw
    noise[0], N Euler-Maruyama steps of the reverse VP SDE with noise[1:], and the classifier fed (x_N + 1) * 0.5
    with no clamp."""
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[round(1000 * t_star) - 1]
    x = math.sqrt(abar) * (2 * u - 1) + math.sqrt(1.0 - abar) * noise[0]
    n = round(t_star / dt)
    h = t_star / n
    for k in range(n):
        t = t_star - k * h
        beta = 0.1 + t * (20.0 - 0.1)
        score_k = score(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        x = x + beta * h * (0.5 * x + score_k) + math.sqrt(beta * h) * noise[1 + k]
    return (x + 1) * 0.5


def test_diffpure_hands_the_classifier_the_unclamped_image_as_nvlabs_does():
    """mode='diffpure' by default: NVlabs DiffPure's (x_N + 1)/2, no clamp, output and gradient (pixels outside
    [0, 1] keep theirs); clamp=True is COUP's fork: the clamped image, no gradient outside [0, 1]; coup and reverse
    clamp by default."""
    score, clf = neural_problem(dtype=torch.float64)
    u = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).round()  # 0 or 1
    noise = torch.randn(6, *u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = torch.randn(u.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(t_star=0.1, dt=0.02, noise=noise)
    out, grad = out_and_grad(lambda v: purify(v, score, clf, mode="diffpure", **kw), u, upstream)
    ref, ref_grad = out_and_grad(lambda v: _nvlabs_diffpure(v, score, noise, 0.1, 0.02), u, upstream)
    outside = (ref < 0) | (ref > 1)
    assert 0.1 < outside.double().mean() < 0.9  # the case the clamp changes
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # the clamp's mask zeroes the upstream of the pixels outside [0, 1]: a different gradient
    _, masked_grad = out_and_grad(lambda v: _nvlabs_diffpure(v, score, noise, 0.1, 0.02), u, upstream * ~outside)
    assert float((ref_grad - masked_grad).norm() / ref_grad.norm()) > 0.1
    out_c, grad_c = out_and_grad(lambda v: purify(v, score, clf, mode="diffpure", clamp=True, **kw), u, upstream)
    torch.testing.assert_close(out_c, ref.clamp(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_c, masked_grad, rtol=1e-10, atol=1e-12)
    for mode in ("coup", "reverse"):  # COUP's code clamps; clamp=False opts out
        clamped = purify(u, score, clf, mode=mode, t_star=0.1, dt=0.02, noise=noise[1:])
        raw = purify(u, score, clf, mode=mode, t_star=0.1, dt=0.02, noise=noise[1:], clamp=False)
        assert torch.equal(clamped, raw.clamp(0, 1)) and not torch.equal(clamped, raw)
    with pytest.raises(ValueError, match="^clamp:"):
        purify(u, score, clf, mode="diffpure", clamp=1, **kw)
    model = coup_fast.PurifiedClassifier(score, clf, mode="diffpure", t_star=0.1, dt=0.02)
    assert model.purify(u).min() < 0 or model.purify(u).max() > 1


def test_diffusion_schedule_is_validated(analytic):
    with pytest.raises(ValueError, match="^diffusion:"):
        purify(_x(), *analytic, mode="diffpure", diffusion="cosine")
    with pytest.raises(ValueError, match="^t_star:.*1/1000"):  # DiffPure's schedule has 1000 discrete steps
        purify(_x(), *analytic, mode="diffpure", t_star=0.0333, dt=0.0333 / 10)
    purify(_x(), *analytic, mode="diffpure", t_star=0.0333, dt=0.0333 / 10, diffusion="vp")  # continuous: any t*


def test_exact_bf16_is_close_to_exact_and_evaluates_in_full_precision():
    """gradient='exact-bf16' (issue 24): the backward-carrying forward and the adjoint run the networks under bf16
    autocast; calls without gradient purify in fp32, bit for bit as 'exact'.  Bounds: bf16 keeps 8 significant
    bits (relative spacing 2^-8 = 0.0039); through N = 5 steps of two networks and their VJPs the measured relative
    error of the gradient is 0.5-2.6 % (dt 1e-3 - 0.02, batch cosine >= 0.99995), so rel <= 0.1 and cosine >= 0.995
    leave a 4x margin while an unrelated direction (cosine ~0) or a lost factor fails them; rel > 1e-4 proves that
    the networks did run in bf16."""
    from coup_fast.data import load_digits
    from coup_fast.evaluate import Defense
    from coup_fast.models import load_digits_models

    score, clf = load_digits_models()
    u, y = load_digits("test", n=16, seed=0)
    kw = dict(t_star=0.1, dt=0.02, lam=1.0, engine="eager")
    grads, outs = {}, {}
    for gradient in ("exact", "exact-bf16"):
        x = u.clone().requires_grad_(True)
        out = purify(x, score, clf, gradient=gradient, generator=torch.Generator().manual_seed(3), **kw)
        loss = torch.nn.functional.cross_entropy(clf(out), y, reduction="sum")
        grads[gradient], outs[gradient] = torch.autograd.grad(loss, x)[0], out.detach()
    g, gb = grads["exact"], grads["exact-bf16"]
    rel = float((gb - g).norm() / g.norm())
    assert 1e-4 < rel < 0.1
    assert float(torch.nn.functional.cosine_similarity(g.flatten(), gb.flatten(), dim=0)) > 0.995
    assert not torch.equal(outs["exact"], outs["exact-bf16"])  # the gradient call's forward ran in bf16 too
    for make in (lambda: u, lambda: u.clone().requires_grad_(True)):  # no gradient: under no_grad, or x a constant
        with torch.no_grad():
            a = purify(make(), score, clf, gradient="exact", generator=torch.Generator().manual_seed(3), **kw)
            b = purify(make(), score, clf, gradient="exact-bf16", generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(a, b)
    b = purify(u, score, clf, gradient="exact-bf16", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(b, outs["exact"])
    api = importlib.import_module("coup_fast.purify")
    knob = api.LOW_PRECISION_GRADIENTS["exact-bf16"]
    assert knob.compute == "bf16"
    wrapper = api.attacker_network(score, knob)
    assert wrapper is api.attacker_network(score, knob) and wrapper.net is score  # one per network, no weight copy
    assert list(score.state_dict()) == list(load_digits_models()[0].state_dict())  # nothing registered on the net
    assert Defense.parse("coup@exact-bf16").label == "coup@exact-bf16"
    assert Defense.parse("coup-lm@exact-bf16").gradient == "exact-bf16"

"""Likelihood-maximization purification (coup_fast.lm): the exact adjoint against plain autograd through an
unrolled float64 loop written here from the formulas, gradcheck, bounded memory, the replayable draws, the
ball, guidance, the digits adapter and clean accuracy, and argument checking."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coup_fast.data import load_digits
from coup_fast.lm import (DEFAULT_T_RANGE, LMConfig, LMDraws, denoising_loss, index_eps_model, index_to_time,
                          lm_solve, solve)
from coup_fast.models import load_digits_models
from coup_fast.sde import vp_alpha, vp_sigma
from problems import TinyClassifier, TinyEpsNet

# The DDPM schedule, independently of coup_fast: Ho et al.'s betas and their cumulative product.
REF_BETAS = torch.from_numpy(np.linspace(1e-4, 0.02, 1000))
REF_ABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
SHAPE = (2, 1, 4, 4)


class IndexedTinyEps(nn.Module):
    """TinyEpsNet on the integer DDPM index (it sees t / 1000)."""

    def __init__(self):
        super().__init__()
        self.net = TinyEpsNet(1)

    def forward(self, x, t):
        return self.net(x, t.to(x.dtype) / 1000.0)


def tiny_nets(seed=0):
    torch.manual_seed(seed)
    eps_net, clf = IndexedTinyEps().double().eval(), TinyClassifier(1, 4).double().eval()
    for p in list(eps_net.parameters()) + list(clf.parameters()):
        p.requires_grad_(False)
    return eps_net, clf


def random_draws(cfg, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    lead = (cfg.n_steps, cfg.n_draws, shape[0])
    t = torch.randint(cfg.t_range[0], cfg.t_range[1] + 1, lead, generator=g)
    return t, torch.randn(*lead, *shape[1:], generator=g, dtype=torch.float64)


def start_state(shape=SHAPE, seed=2):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.8


def reference_unrolled(x0, eps_net, clf, cfg, t_all, eps_all, detach_guidance=False, trace=None):
    """x_M by plain autograd through the M steps (create_graph everywhere), written from the formulas:
    per-draw network calls, torch's documented Adam, the projections as masks (1 inside the ball or the box,
    faces included, 0 strictly outside: the subgradient coup_fast.lm states) times d plus the constant face
    point, so that no torch clamp, max or min picks a derivative on a kink."""
    dims = tuple(range(1, x0.ndim))
    b1, b2 = cfg.betas
    x, m, v = x0, torch.zeros_like(x0), torch.zeros_like(x0)
    for k in range(cfg.n_steps):
        loss = 0.0
        for j in range(cfg.n_draws):
            t, e = t_all[k, j], eps_all[k, j]
            a = REF_ABAR[t].view(-1, 1, 1, 1)
            pred = eps_net(a.sqrt() * x + (1 - a).sqrt() * e, t)
            sq = (pred - e).pow(2).sum(dim=dims) if cfg.reduction == "sum" else (pred - e).pow(2).mean(dim=dims)
            w = {"x0": (1 - REF_ABAR[t]) / REF_ABAR[t], "simple": torch.ones(len(t), dtype=torch.float64),
                 "elbo": REF_BETAS[t] / (2 * (1 - REF_BETAS[t]) * (1 - REF_ABAR[t]))}[cfg.weighting]
            loss = loss + (w * sq).sum() / cfg.n_draws
        if cfg.lam > 0:
            confidence = F.log_softmax(clf((x + 1) / 2), dim=1).max(dim=1).values.sum()
        if cfg.lam > 0 and not detach_guidance:
            loss = loss - cfg.lam * confidence
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        if cfg.lam > 0 and detach_guidance:
            (gc,) = torch.autograd.grad(confidence, x, retain_graph=True)
            g = g - cfg.lam * gc.detach()
        if cfg.rule == "adam":
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - cfg.lr * (m / (1 - b1 ** (k + 1))) / ((v / (1 - b2 ** (k + 1))).sqrt() + cfg.adam_eps)
        elif cfg.rule == "sign":
            m = cfg.momentum * m + g / g.abs().sum(dim=dims, keepdim=True)
            x = x - cfg.lr * torch.sign(m)
        else:
            m = cfg.momentum * m + g / g.pow(2).sum(dim=dims, keepdim=True).sqrt()
            x = x - cfg.lr * m
        d = x - x0
        if cfg.ball == "l2":
            n = d.pow(2).sum(dim=dims, keepdim=True).sqrt()
            if trace is not None:
                trace.append(bool((n > cfg.radius).any()))
            inside = (n <= cfg.radius).to(x.dtype)  # on the sphere: the identity
            x = x0 + inside * d + (1 - inside) * d * (cfg.radius / n)
        else:
            if trace is not None:
                trace.append(bool((d.abs() > cfg.radius).any()))
            inside = (d.abs() <= cfg.radius).to(x.dtype)  # on a face: d passes through
            x = x0 + inside * d + (1 - inside) * cfg.radius * torch.sign(d)
        if cfg.clamp:
            inside = (x.abs() <= 1.0).to(x.dtype)
            x = inside * x + (1 - inside) * torch.sign(x)
    return x


def rel(a, b):
    return float((a - b).norm() / b.norm())


CASES = [  # rule, ball, radius (binding after a step or two), lam, extra
    ("adam", "l2", 0.5, 0.7, {}),
    ("adam", "linf", 0.15, 0.7, {"clamp": True}),
    ("adam", "l2", 0.5, 0.0, {"weighting": "elbo", "reduction": "mean"}),
    ("sign", "linf", 0.15, 0.7, {"momentum": 0.5}),
    ("sign", "l2", 0.5, 0.7, {}),
    ("normalized", "l2", 0.3, 0.7, {"weighting": "simple"}),
    ("normalized", "linf", 0.1, 0.7, {}),
]


@pytest.mark.parametrize("rule, ball, radius, lam, extra", CASES)
@pytest.mark.parametrize("gradient", ["exact", "detached-guidance"])
def test_gradient_equals_unrolled_autograd_float64(rule, ball, radius, lam, extra, gradient):
    eps_net, clf = tiny_nets()
    cfg = LMConfig(n_steps=3, rule=rule, ball=ball, radius=radius, lam=lam, n_draws=2, **extra)
    t, e = random_draws(cfg, SHAPE)
    x0 = start_state()
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    x = x0.clone().requires_grad_(True)
    out = lm_solve(x, eps_net, clf, cfg, draws=(t, e), gradient=gradient)
    (grad,) = torch.autograd.grad(out, x, upstream)

    trace = []
    xr = x0.clone().requires_grad_(True)
    ref = reference_unrolled(xr, eps_net, clf, cfg, t, e, detach_guidance=gradient != "exact", trace=trace)
    (ref_grad,) = torch.autograd.grad(ref, xr, upstream)
    assert any(trace), "the ball never bound: the projection's Jacobian was not tested"
    assert rel(out.detach(), ref.detach()) <= 1e-12
    assert rel(grad, ref_grad) <= 1e-8
    if rule != "sign":  # the sign rule has no network term in its Jacobian (see coup_fast.lm)
        assert rel(grad, upstream) > 1e-3


class ScriptedEps(nn.Module):
    """An eps-network on the DDPM index whose loss gradient has a prescribed sign per pixel and phase:
    eps(y, t) = y + c with c = 100 pattern for t < 150 and -100 pattern from 150 on.  The loss w ||eps(x_t) - e||^2
    then has the gradient 2 w sqrt(abar) (sqrt(abar) x + (sqrt(1 - abar) - 1) e + c), of the sign of c while
    |x| and |e| stay far below 100, so rule 'sign' with momentum 0 moves a pixel by -lr sign(c) per step, exactly."""

    def __init__(self, pattern):
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward(self, y, t):
        phase = torch.where(t < 150, 1.0, -1.0).to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        return y + 100.0 * phase * self.pattern


def faces_closed_form(x0, moves, radius, ball=True):
    """x_M and dx_M/dx_0 per pixel of x_{k+1} = box(ball(x_k + move_k)) in exact (dyadic) arithmetic, with the
    ball's faces and the box's faces passing the iterate through (`inclusive`, coup_fast.lm's subgradient) and
    with the other convention (`exclusive`: a face clamps, as torch 2.14's clamp differentiates), and how many
    times an iterate landed exactly on a face of the ball / of the box [-1, 1]."""
    out = {}
    for convention in ("inclusive", "exclusive"):
        x, jac, hits = x0.clone(), torch.ones_like(x0), [0, 0]
        for move in moves:
            pre = x + move
            d = pre - x0
            if ball:
                hits[0] += int((d.abs() == radius).sum())
                keep = d.abs() <= radius if convention == "inclusive" else d.abs() < radius
                x = torch.where(keep, pre, x0 + radius * torch.sign(d))
                jac = torch.where(keep, jac, torch.ones_like(jac))  # on the ball's face x = x0 + r sign(d)
            else:
                x = pre
            hits[1] += int((x.abs() == 1).sum())
            keep = x.abs() <= 1 if convention == "inclusive" else x.abs() < 1
            x, jac = torch.where(keep, x, torch.sign(x)), torch.where(keep, jac, torch.zeros_like(jac))
        out[convention] = (x, jac, hits)
    return out


def _quarter_grid_start(shape=SHAPE):
    """Start states on the 1/4 grid of [-1, 1], the box's faces included (digits' pixels 0 and 1 are -1 and 1)."""
    return (torch.arange(math.prod(shape), dtype=torch.float64) % 9 * 0.25 - 1.0).reshape(shape)


def test_sign_rule_with_iterates_exactly_on_the_ball_and_box_faces():
    """rule 'sign', L-inf r = 0.5, clamp=True, lr 1/8 on a 1/4-grid start: iterates land exactly on the ball's and
    the box's faces.  The gradient is the closed form of the inclusive subgradient (a face passes the iterate
    through), whatever torch's clamp does on a bound (torch 2.14 gives 0 there: the exclusive column)."""
    pattern = torch.tensor([1.0, -1.0]).repeat(8).reshape(1, 1, 4, 4).double()
    eps_net = ScriptedEps(pattern)
    cfg = LMConfig(n_steps=9, rule="sign", lr=0.125, momentum=0.0, ball="linf", radius=0.5, clamp=True)
    t = torch.tensor([120] * 3 + [160] * 6).reshape(9, 1, 1).expand(9, 1, SHAPE[0]).contiguous()
    e = torch.zeros(9, 1, *SHAPE, dtype=torch.float64)
    x0 = _quarter_grid_start()
    moves = [-cfg.lr * pattern] * 3 + [cfg.lr * pattern] * 6
    forms = faces_closed_form(x0, moves, cfg.radius)
    want_x, want_jac, hits = forms["inclusive"]
    assert hits[0] > 0 and hits[1] > 0, "no iterate landed on a face: the kinks were not tested"
    assert not torch.equal(want_jac, forms["exclusive"][1]), "the two conventions agree here: the test cannot fail"
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    out = lm_solve(x, eps_net, None, cfg, draws=(t, e))
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(out.detach(), want_x)
    assert torch.equal(grad, upstream * want_jac)
    xr = x0.clone().requires_grad_(True)  # the unrolled reference states the same subgradient with masks
    (ref,) = torch.autograd.grad(reference_unrolled(xr, eps_net, None, cfg, t, e), xr, upstream)
    assert torch.equal(ref, upstream * want_jac)


def test_lm_through_purify_with_the_final_image_exactly_on_0_and_1():
    """LMConfig(rule='sign', clamp=True) through purify: iterates reach exactly -1 and 1 at the last step, so the
    purified images are exactly 0 and 1 and both the box's clamp and the pipeline's [0, 1] clamp sit on a bound.
    The gradient to the images is the inclusive closed form (u -> 2u - 1 and back: factors 2 and 1/2)."""
    from coup_fast import purify

    pattern = torch.tensor([1.0, -1.0]).repeat(8).reshape(1, 1, 4, 4).double()
    cfg = LMConfig(n_steps=2, rule="sign", lr=0.125, momentum=0.0, clamp=True, t_range=(120, 120))
    x0 = _quarter_grid_start()
    forms = faces_closed_form(x0, [-cfg.lr * pattern] * 2, None, ball=False)  # the L2 ball (r = 200) never binds
    want_x, want_jac, hits = forms["inclusive"]
    assert hits[1] > 0 and bool(((want_x.abs() == 1) & (want_jac == 1)).any())  # a face that keeps its gradient
    assert not torch.equal(want_jac, forms["exclusive"][1])
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = ((x0 + 1) / 2).requires_grad_(True)
    out = purify(u, ScriptedEps(pattern), None, mode="likelihood-max", lam=0.0, lm=cfg,
                 generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out, u, upstream)
    assert torch.equal(out.detach(), (want_x + 1) / 2)
    assert torch.equal(grad, upstream * want_jac)


def test_exact_and_detached_differ_by_the_guidance_hessian_only():
    eps_net, clf = tiny_nets()
    x0, upstream = start_state(), torch.randn(SHAPE, dtype=torch.float64)
    grads = {}
    for lam in (0.0, 1.0):
        cfg = LMConfig(n_steps=3, radius=0.5, lam=lam)
        draws = random_draws(cfg, SHAPE)
        for gradient in ("exact", "detached-guidance"):
            x = x0.clone().requires_grad_(True)
            out = lm_solve(x, eps_net, clf, cfg, draws=draws, gradient=gradient)
            (grads[lam, gradient],) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grads[0.0, "exact"], grads[0.0, "detached-guidance"])
    assert rel(grads[1.0, "detached-guidance"], grads[1.0, "exact"]) > 1e-3


@pytest.mark.parametrize("rule, ball, radius", [("adam", "l2", 0.5), ("sign", "linf", 0.15),
                                                ("normalized", "l2", 0.15)])
def test_gradcheck_exact(rule, ball, radius):
    eps_net, clf = tiny_nets()
    cfg = LMConfig(n_steps=2, rule=rule, ball=ball, radius=radius, lam=0.7)
    x = start_state().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: lm_solve(s, eps_net, clf, cfg, seed=11), (x,), eps=1e-6, atol=1e-6)


def test_bpda_is_straight_through_with_the_same_forward():
    eps_net, clf = tiny_nets()
    cfg = LMConfig(n_steps=2, lam=0.5)
    x, upstream = start_state().requires_grad_(True), torch.randn(SHAPE, dtype=torch.float64)
    out = lm_solve(x, eps_net, clf, cfg, seed=4, gradient="bpda")
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grad, upstream)
    assert torch.equal(out.detach(), lm_solve(x.detach(), eps_net, clf, cfg, seed=4))


@pytest.mark.parametrize("rule, per_step", [("adam", 3), ("sign", 2)])
def test_memory_is_the_trajectory_only(rule, per_step):
    eps_net, clf = tiny_nets()
    for n_steps in (2, 5):
        cfg = LMConfig(n_steps=n_steps, rule=rule, lam=0.5)
        x = start_state().requires_grad_(True)
        node = lm_solve(x, eps_net, clf, cfg, seed=3).grad_fn
        saved = node.saved_tensors
        assert len(saved) == per_step * n_steps
        assert all(s.shape == SHAPE and s.grad_fn is None for s in saved)  # states only, no graph kept
        assert node.draws.t is None and node.draws.eps is None  # the draws are regenerated, never stored


def test_seeded_draws_replay_and_match_their_explicit_tensors():
    eps_net, clf = tiny_nets()
    cfg = LMConfig(n_steps=3, lam=0.5, n_draws=2)
    x0, upstream = start_state(), torch.randn(SHAPE, dtype=torch.float64)

    def run(**kw):
        x = x0.clone().requires_grad_(True)
        out = lm_solve(x, eps_net, clf, cfg, **kw)
        return out.detach(), torch.autograd.grad(out, x, upstream)[0]

    a, b, c = run(seed=123), run(seed=123), run(seed=124)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])
    explicit = run(draws=LMDraws(x0, cfg, seed=123).as_tensors())  # what the backward pass regenerates
    assert torch.equal(a[0], explicit[0]) and rel(a[1], explicit[1]) <= 1e-14
    g = torch.Generator().manual_seed(0)
    assert torch.equal(lm_solve(x0, eps_net, clf, cfg, generator=g),
                       lm_solve(x0, eps_net, clf, cfg, generator=torch.Generator().manual_seed(0)))


def test_draws_are_standard_normal_and_uniform_on_the_t_range():
    cfg = LMConfig(n_steps=50, n_draws=2)
    t, eps = LMDraws(torch.zeros(64, 1, 8, 8), cfg, seed=7).as_tensors()
    lo, hi = cfg.t_range
    assert int(t.min()) == lo and int(t.max()) == hi
    counts = torch.bincount(t.flatten() - lo, minlength=hi - lo + 1).double()
    expected = t.numel() / (hi - lo + 1)  # 6400 draws over 54 values: ~118 each
    assert float(((counts - expected) ** 2 / expected).sum()) < 2 * (hi - lo)  # chi-square, 53 d.o.f.
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1) < 0.01
    assert not torch.equal(t[0], t[1]) and not torch.equal(eps[0, 0], eps[0, 1])
    # the index words and the normals come from disjoint counters: t is not a function of the normals' words
    pairs = torch.stack([t[:, 0].double().flatten(), eps[:, 0, :, 0, 0, 0].flatten()])
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 0.1


@pytest.mark.parametrize("ball, radius", [("l2", 0.4), ("linf", 0.12)])
def test_every_iterate_stays_in_the_ball(ball, radius):
    eps_net, clf = tiny_nets()
    cfg = LMConfig(n_steps=6, ball=ball, radius=radius, lam=0.5)
    x0, iterates = start_state(), []
    solve(x0, eps_net, clf, cfg, LMDraws(x0, cfg, seed=5), callback=lambda info: iterates.append(info["x"]))
    p = 2 if ball == "l2" else math.inf
    dist = torch.stack([torch.linalg.vector_norm((x - x0).flatten(1), ord=p, dim=1) for x in iterates])
    assert float(dist.max()) <= radius * (1 + 1e-12)
    assert float(dist.max()) >= radius * (1 - 1e-12)  # it did bind


def test_runs_under_no_grad_and_refuses_inference_mode():
    eps_net, clf = tiny_nets()
    cfg, x0 = LMConfig(n_steps=2, lam=0.5), start_state()
    with torch.no_grad():  # LM differentiates its objective inside; no_grad outside must not stop it
        out = lm_solve(x0, eps_net, clf, cfg, seed=1)
    assert torch.equal(out, lm_solve(x0, eps_net, clf, cfg, seed=1)) and not torch.equal(out, x0)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        lm_solve(x0, eps_net, clf, cfg, seed=1)


def test_lam_zero_is_unguided_lm():
    eps_net, clf = tiny_nets()
    cfg = LMConfig(n_steps=3, radius=0.5)
    draws = random_draws(cfg, SHAPE)
    x0 = start_state()
    plain = lm_solve(x0, eps_net, None, cfg, draws=draws)
    assert torch.equal(plain, lm_solve(x0, eps_net, clf, cfg, draws=draws))
    ref = reference_unrolled(x0.clone().requires_grad_(True), eps_net, clf, cfg, *draws).detach()
    assert rel(plain, ref) <= 1e-12
    guided = lm_solve(x0, eps_net, clf, LMConfig(n_steps=3, radius=0.5, lam=1.0), draws=draws)
    assert rel(guided, plain) > 1e-3


def test_default_t_range_is_edm_sigma_0p4_to_0p6_and_the_time_map():
    sigma = ((1 - REF_ABAR) / REF_ABAR).sqrt()
    lo, hi = DEFAULT_T_RANGE
    assert (lo, hi) == (117, 170)
    assert sigma[lo - 1] < 0.4 <= sigma[lo] and sigma[hi] <= 0.6 < sigma[hi + 1]
    assert index_to_time(0) == 1e-3 and index_to_time(999) == 1.0
    j = torch.arange(1000, dtype=torch.float64)
    # (j + 1)/N: abar_0 = alpha(t_0)^2 to second order; j/N misses a whole beta_0 = 1e-4
    assert abs(math.log(REF_ABAR[0]) - 2 * math.log(vp_alpha(index_to_time(0)))) < 2e-5
    assert abs(math.log(REF_ABAR[0]) - 2 * math.log(vp_alpha(0.0))) > 9e-5
    band = slice(lo, hi + 1)
    err = ((1 - REF_ABAR[band]).sqrt() / vp_sigma(index_to_time(j[band])) - 1).abs().max()
    assert err < 3e-3 < ((1 - REF_ABAR[band]).sqrt() / vp_sigma(j[band] / 1000) - 1).abs().max()


def test_x0_weighting_is_chen_et_al_edm_denoiser_mse():
    """T1's loss mse(D(x + sigma eps, sigma), x), with the EDM denoiser of an eps-network, per image."""
    eps_net, _ = tiny_nets()
    cfg = LMConfig(reduction="mean")
    x = start_state()
    t, e = random_draws(LMConfig(n_steps=1), SHAPE)
    t, e = t[0], e[0]
    a = REF_ABAR[t[0]].view(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt()
    denoised = x + sigma * e[0] - sigma * eps_net(a.sqrt() * (x + sigma * e[0]), t[0])
    edm = (denoised - x).pow(2).mean(dim=(1, 2, 3))
    assert rel(denoising_loss(x, t, e, eps_net, cfg), edm) < 1e-12


@pytest.fixture(scope="module")
def digits():
    score, clf = load_digits_models()
    u, y = load_digits("test", n=64, seed=0)
    return index_eps_model(score), score, clf, u, y


def test_digits_adapter_is_the_score_models_eps_network(digits):
    eps_model, score, _, u, _ = digits
    x = u[:8] * 2 - 1
    for j in (0, 117, 500, 999):
        t = torch.full((8,), j)
        direct = score.eps_model(x, torch.full((8,), 999.0 * (j + 1) / 1000))
        assert rel(eps_model(x, t), direct) < 1e-5  # the label 999 (j + 1)/1000, up to its float32 round-off
        generic = index_eps_model(lambda s, tt: score(s, tt))(x, t)  # any score model: -sigma(t) s(x, t)
        assert rel(generic, direct) < 1e-5
    # a real denoiser on the default t range: well below eps_hat = 0 (which scores 1 per pixel)
    cfg = LMConfig(n_steps=1, n_draws=8, reduction="mean", weighting="simple")
    t, e = LMDraws(x, cfg, seed=0).step(0)
    with torch.no_grad():
        loss = float(denoising_loss(x, t, e, eps_model, cfg).mean())
    assert 0.05 < loss < 0.4


def test_lm_on_digits_raises_likelihood_keeps_accuracy_and_guidance_raises_confidence(digits):
    eps_model, _, clf, u, y = digits
    with torch.no_grad():
        assert float((clf(u).argmax(1) == y).float().mean()) >= 0.95
    # noisy inputs, so that LM has something to remove and the classifier is not saturated
    noisy = (u + 0.3 * torch.randn(u.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    def lm_images(images, lam):  # LM on images in [0, 1], as purify(mode='likelihood-max') runs it
        return ((lm_solve(images * 2 - 1, eps_model, clf, LMConfig(lam=lam), seed=0) + 1) / 2).clamp(0, 1)

    out = {lam: lm_images(noisy, lam) for lam in (0.0, 1.0)}
    clean = {lam: lm_images(u, lam) for lam in (0.0, 1.0)}
    eval_cfg = LMConfig(n_steps=1, n_draws=16, reduction="mean", weighting="simple")
    with torch.no_grad():
        t, e = LMDraws(u, eval_cfg, seed=99).step(0)
        before = float(denoising_loss(noisy * 2 - 1, t, e, eps_model, eval_cfg).mean())
        after = float(denoising_loss(out[0.0] * 2 - 1, t, e, eps_model, eval_cfg).mean())
        doubt = {lam: -float(F.log_softmax(clf(out[lam]), 1).max(1).values.mean()) for lam in out}  # -log max p
        acc = {lam: float((clf(clean[lam]).argmax(1) == y).float().mean()) for lam in clean}
    assert after < 0.9 * before  # LM lowers the denoising loss (raises the ELBO)
    assert doubt[1.0] < 0.5 * doubt[0.0]  # guidance raises the classifier's confidence (measured 0.015 vs 0.066)
    assert acc[0.0] >= 0.9 and acc[1.0] >= 0.9  # measured 1.0 and 0.984 (bare classifier 0.984)


def test_digits_exact_gradient_equals_unrolled_autograd(digits):
    eps_model, score, clf, u, _ = digits
    net, clf64 = score.double(), clf.double()  # module-scoped copies are float32: restore afterwards
    try:
        cfg = LMConfig(n_steps=2, lam=1.0, radius=0.8)
        x0 = (u[:2] * 2 - 1).double()
        t, e = random_draws(cfg, x0.shape)
        x = x0.clone().requires_grad_(True)
        upstream = torch.randn(x0.shape, dtype=torch.float64)
        (grad,) = torch.autograd.grad(lm_solve(x, eps_model, clf64, cfg, draws=(t, e)), x, upstream)
        xr = x0.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(reference_unrolled(xr, eps_model, clf64, cfg, t, e), xr, upstream)
        assert rel(grad, ref) <= 1e-8
    finally:
        net.float(), clf.float()


@pytest.mark.parametrize("field, value", [
    ("n_steps", 0), ("n_steps", 2.5), ("lr", 0.0), ("lr", float("nan")), ("rule", "sgd"), ("ball", "l1"),
    ("radius", -1.0), ("t_range", (5, 3)), ("t_range", (0, 1000)), ("t_range", 5), ("weighting", "snr"),
    ("reduction", "max"), ("lam", -1.0), ("lam", float("inf")), ("n_draws", 0), ("betas", (0.9, 1.0)),
    ("adam_eps", 0.0), ("momentum", -0.5), ("clamp", 1)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LMConfig(**{field: value})


def test_config_radius_defaults_per_ball():
    assert LMConfig().radius == 200.0 and LMConfig(ball="linf").radius == 0.5


def test_argument_validation_names_the_argument():
    eps_net, clf = tiny_nets()
    x, cfg = start_state(), LMConfig(n_steps=2, lam=0.5)
    t, e = random_draws(cfg, SHAPE)
    bad = [
        ("x", dict(x=x.long())), ("x", dict(x=torch.full(SHAPE, float("nan"), dtype=torch.float64))),
        ("config", dict(config={"n_steps": 2})), ("classifier", dict(classifier=None)),
        ("gradient", dict(gradient="adjoint")), ("seed", dict(seed=-1)), ("seed", dict(seed=True)),
        ("draws", dict(draws=(t[:1], e[:1]))), ("draws", dict(draws=(t + 1000, e))),
        ("draws", dict(draws=(t.double(), e))), ("draws", dict(draws=(t, e), seed=3)),
        ("eps_model", dict(eps_model=lambda s, tt: s[:, :, :2])), ("generator", dict(generator=3)),
    ]
    for name, change in bad:
        kwargs = dict(x=x, eps_model=eps_net, classifier=clf, config=cfg, seed=1)
        kwargs.update(change)
        if "draws" in change and "seed" not in change:
            kwargs.pop("seed")
        with pytest.raises(ValueError, match=f"^{name}:"):
            lm_solve(kwargs.pop("x"), kwargs.pop("eps_model"), kwargs.pop("classifier"), kwargs.pop("config"), **kwargs)


def test_purify_mode_likelihood_max_is_lm_solve_through_the_pipeline():
    # purify(mode='likelihood-max') = images -> states -> lm_solve with the stream's seed -> images; samples=K
    # draws K seeds in order, as K calls would; lam is purify's
    from coup_fast import purify
    from coup_fast.noise import draw_seed

    eps_model, clf = tiny_nets()
    u = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seed = draw_seed(torch.Generator().manual_seed(9))
    want = ((lm_solve(2 * u - 1, eps_model, clf, LMConfig(lam=0.7), seed=seed) + 1) / 2).clamp(0, 1)
    got = purify(u, eps_model, clf, mode="likelihood-max", lam=0.7, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(4)
    seq = torch.cat([purify(u, eps_model, clf, mode="likelihood-max", lam=0.7, generator=gen) for _ in range(2)])
    batched = purify(u, eps_model, clf, mode="likelihood-max", lam=0.7, samples=2,
                     generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(batched, seq, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="^gradient:"):
        purify(u, eps_model, clf, mode="likelihood-max", gradient="adjoint")
    with pytest.raises(ValueError, match="^noise:"):
        purify(u, eps_model, clf, mode="likelihood-max", noise=torch.zeros(1))

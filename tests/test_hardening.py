"""Bad input is a clear error naming the argument, and non-finite results never pass silently (issue 17)."""
import pytest
import torch

from coup_fast import PurifiedClassifier, purify
from problems import neural_problem


@pytest.fixture
def nets():
    return neural_problem()


def _x(b=3):
    return torch.rand(b, 1, 4, 4, generator=torch.Generator().manual_seed(0))


KW = dict(t_star=0.02, dt=0.005)


class _NaNBelow(torch.nn.Module):
    """A score model that returns NaN once t drops below t_nan."""

    def __init__(self, score, t_nan):
        super().__init__()
        self.score, self.t_nan = score, t_nan

    def forward(self, x, t):
        out = self.score(x, t)
        return out * float("nan") if float(t[0]) < self.t_nan else out


def test_a_score_model_returning_nan_is_named_with_its_step(nets):
    score, clf = nets
    with pytest.raises(ValueError, match=r"^score_model: returned NaN or Inf at step 2 \(t = 0\.01"):
        purify(_x(), _NaNBelow(score, 0.011), clf, **KW)
    out = purify(_x(), _NaNBelow(score, 0.011), clf, check_finite=False, **KW)  # the flag turns the check off
    assert torch.isnan(out).any()


def test_a_classifier_returning_nan_logits_is_named(nets):
    score, clf = nets
    with pytest.raises(ValueError, match="^classifier: its confidence gradient is NaN"):
        purify(_x(), score, lambda u: clf(u) * float("nan"), **KW)


def test_overflowing_noise_is_reported(nets):
    # finite draws so large that the state overflows float32 within a few steps
    _, clf = nets
    growing = lambda x, t: 1e3 * x  # noqa: E731  (finite for finite x)
    noise = torch.full((4, 3, 1, 4, 4), 1e36)
    with pytest.raises(ValueError, match=r"^(noise: the state overflowed|score_model: .*states up to \|x\| = [0-9.]+e\+3)"):
        purify(_x(), growing, clf, noise=noise, **KW)


def test_a_non_finite_gradient_is_reported(nets):
    score, clf = nets

    class NaNDerivative(torch.nn.Module):  # finite values, NaN derivative: d/dx sqrt(x - x) at 0
        def forward(self, x, t):
            return score(x, t) + torch.sqrt((x - x.detach()).abs())

    x = _x().requires_grad_(True)
    out = purify(x, NaNDerivative(), clf, **KW)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="^gradient: the backward pass gave NaN or Inf"):
        out.sum().backward()


@pytest.mark.parametrize("case,name", [
    (dict(x=torch.rand(2, 1, 4, 4, device="meta")), "x"),
    (dict(x=_x().double()), "x"),  # float64 images, float32 networks
    (dict(score=lambda x, t: (torch.zeros_like(x),)), "score_model"),  # a tuple
    (dict(score=lambda x, t: None), "score_model"),
    (dict(clf=lambda u: None), "classifier"),
    (dict(clf="detached"), "classifier"),
    (dict(noise=torch.zeros(4, 3, 1, 4, 4), generator=torch.Generator()), "generator"),  # noise wins: say so
    (dict(noise=torch.zeros(4, 3, 1, 4, 4, requires_grad=True)), "noise"),  # no gradient would reach it
    (dict(dt=1e-7, t_star=0.1), "dt"),  # 10^6 steps
    (dict(samples=0), "samples"),
    (dict(check_finite="yes"), "check_finite"),
])
def test_bad_arguments_name_themselves(nets, case, name):
    score, clf = nets
    x = case.pop("x", _x())
    score = case.pop("score", score)
    clf = case.pop("clf", clf)
    if clf == "detached":
        base = neural_problem()[1]
        clf = lambda u: base(u).detach()  # noqa: E731
    kw = {**KW, **case}
    with pytest.raises(ValueError, match=rf"^{name}:"):
        purify(x, score, clf, **kw)


def test_many_steps_need_the_limit_raised(nets):
    score, clf = nets
    with pytest.raises(ValueError, match=r"^dt:.*N = 200 steps.*max_steps"):
        purify(_x(), score, clf, t_star=0.2, dt=1e-3, max_steps=100)
    assert purify(_x(), score, clf, t_star=0.2, dt=1e-3, max_steps=200).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(t_star=5), "t_star"), (dict(mode="x"), "mode"), (dict(foo=1), "foo"), (dict(lam=True), "lam"),
    (dict(gradient="nope"), "gradient"), (dict(engine="jit"), "engine"), (dict(memory="huge"), "memory"),
    (dict(noise=torch.zeros(4, 3, 1, 4, 4)), "noise"), (dict(generator=3), "generator"),
])
def test_purified_classifier_validates_everything_when_it_is_built(nets, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        PurifiedClassifier(*nets, **kwargs)


def test_batched_samples_are_the_sequential_calls(nets):
    # samples=K draws K seeds in order, sample r exactly as the r-th of K calls; gradients to round-off
    score, clf = nets
    x = _x(2)
    w = torch.randn(3 * 2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for mode in ("coup", "diffpure"):
        gen = torch.Generator().manual_seed(5)
        xs = x.clone().requires_grad_(True)
        seq = [purify(xs, score, clf, mode=mode, generator=gen, **KW) for _ in range(3)]
        gen = torch.Generator().manual_seed(5)
        xb = x.clone().requires_grad_(True)
        batched = purify(xb, score, clf, mode=mode, generator=gen, samples=3, **KW)
        torch.testing.assert_close(batched, torch.cat(seq), rtol=1e-5, atol=1e-6)
        (g_seq,) = torch.autograd.grad((torch.cat(seq) * w).sum(), xs)
        (g_batched,) = torch.autograd.grad((batched * w).sum(), xb)
        torch.testing.assert_close(g_batched, g_seq, rtol=1e-4, atol=1e-6)

"""coup_fast.paper.toy: the 2-Gaussian label-flip study (Sec. 5.3.2) and Proposition 2."""
from __future__ import annotations

import math

import pytest
import torch

from coup_fast.analytic import GaussianMixture
from coup_fast.guidance import confidence_grad
from coup_fast.paper import toy




def test_fast_score_is_the_gaussian_mixture_score():
    gmm = GaussianMixture(torch.tensor(toy.MEANS, dtype=torch.float64)[:, None], [toy.STD, toy.STD])
    x = 3 * torch.randn(500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (1e-3, 0.05, 0.1, 0.7, torch.linspace(1e-3, 0.1, 500, dtype=torch.float64)):
        torch.testing.assert_close(toy.toy_mixture()(x, t), gmm(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [0.0, 1.0, 10.0])
def test_classifier_is_the_papers_formula(c):
    x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)
    p0 = torch.exp(-0.5 * (x + 0.5) ** 2) / math.sqrt(2 * math.pi)
    p1 = torch.exp(-0.5 * (x - 0.5) ** 2) / math.sqrt(2 * math.pi)
    q = (p1 / (p0 + p1 + c * torch.sin(100 * x) / 100)).clamp(toy.TINY, 1 - toy.TINY)
    clf = toy.NoisyToyClassifier(c)
    torch.testing.assert_close(clf.prob1(x), q, rtol=1e-10, atol=1e-14)
    probs = torch.softmax(clf(((x + 1) / 2)[:, None]), dim=1)
    torch.testing.assert_close(probs[:, 1], q, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(probs.sum(1), torch.ones_like(x))


def test_classifier_clamps_out_of_range_probabilities():
    """With c = 10 the denominator changes sign far from the modes: q stays in [tiny, 1 - tiny], grads finite."""
    clf = toy.NoisyToyClassifier(10.0)
    x = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    raw_den = toy._normal_pdf(x, -0.5) + toy._normal_pdf(x, 0.5) + 10 * torch.sin(100 * x) / 100
    assert (raw_den < 0).any()  # the case the clamp is for
    q = clf.prob1(x)
    assert float(q.min()) >= toy.TINY and float(q.max()) <= 1 - toy.TINY
    g = confidence_grad(clf, x[:, None])
    assert torch.isfinite(clf(((x + 1) / 2)[:, None])).all() and torch.isfinite(g).all()
    q32 = clf.prob1(x.float())  # float32: tiny becomes the dtype's eps, log1p(-q) stays finite
    assert torch.isfinite(clf(((x.float() + 1) / 2)[:, None])).all() and float(q32.max()) < 1


def test_exact_flip_probability_matches_quadrature():
    assert toy.exact_flip_probability() == pytest.approx(toy.quadrature_flip_probability(), abs=1e-7)
    assert toy.exact_flip_probability(0.0) == pytest.approx(0.5, abs=1e-12)  # symmetry


def test_unguided_flip_probability_matches_the_posterior():
    """lam = 0, exact score: the reverse SDE keeps the forward marginals -> P(x_0 < 0 | x_t* = 0.2)."""
    n = 40_000
    noise = torch.randn(toy.ReverseGrid.from_dt(toy.T_STAR, toy.DT).n_steps, n, 1,
                        generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = toy.simulate(0.0, 0.0, noise)
    flip = float((res["x_final"] < 0).double().mean())
    exact = toy.exact_flip_probability()
    se = math.sqrt(exact * (1 - exact) / n)
    assert abs(flip - exact) < 4 * se + 2e-3, (flip, exact, se)  # 2e-3: Euler bias allowance at dt = 1e-3


def test_flip_probability_decreases_with_lam_and_outputs(tmp_path):
    r = toy.run_toy(str(tmp_path), n_paths=4000, c_grid=(0.0, 5.0), lam_grid=(0.0, 1.0, 5.0), dt=2e-3,
                    progress=False)
    flips = {(row["c"], row["lam"]): row["flip_prob"] for row in r["rows"]}
    assert flips[0.0, 0.0] > flips[0.0, 1.0] > flips[0.0, 5.0]
    assert flips[0.0, 0.0] == flips[5.0, 0.0]  # lam = 0 ignores the classifier (shared solve)
    assert r["prop2"]["min_frac_global"] == 1.0 and r["prop2"]["min_frac_per_path"] == 1.0
    for ext in ("csv", "json"):
        assert (tmp_path / f"toy.{ext}").stat().st_size > 0
    png = tmp_path / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert "| 5 |" in toy.toy_table(r)


def test_paths_run_through_the_engine(monkeypatch):
    """The study calls coup_fast.purify.solve, not a private copy of the update."""
    import coup_fast.paper.toy as module

    calls = []
    real = module.solve
    monkeypatch.setattr(module, "solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    noise = torch.randn(5, 10, 1, dtype=torch.float64)
    module.simulate(1.0, 1.0, noise, t_star=0.01, dt=2e-3)
    assert calls == [1]


def test_prop2_bound_formula():
    g = toy.vp_gamma(0.1)
    assert toy.prop2_bound(0.1, 1.0, 2.0, 3.0, 0.5) == pytest.approx(
        3 * g + (math.exp(g) - 1) * 3 + math.sqrt(math.exp(2 * g) - 1) * 0.5)


@pytest.mark.parametrize("c", [0.0, 2.0, 10.0])
def test_closed_form_guidance_matches_autograd(c):
    """The hand-written backward equals autograd through the paper's formula, clamp included."""
    clf = toy.NoisyToyClassifier(c)
    x = torch.linspace(-4, 4, 4001, dtype=torch.float64)[:, None]

    class Plain(torch.nn.Module):
        def forward(self, u):
            q = clf.prob1((2 * u - 1)[:, 0])
            return torch.stack([torch.log1p(-q), torch.log(q)], 1)

    torch.testing.assert_close(confidence_grad(clf, x), confidence_grad(Plain(), x), rtol=1e-8, atol=1e-10)


def test_wiener_eps_is_the_standardised_noise_displacement_of_the_euler_path():
    # with no score and no guidance the Euler recursion is linear: x_N = x_0 prod(1 + b_k/2) + noise
    # displacement, so wiener_eps times its deviation must equal that displacement exactly
    grid = toy.ReverseGrid.from_dt(0.1, 1e-3)
    noise = torch.randn(grid.n_steps, 5000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, growth = torch.zeros(5000, 1, dtype=torch.float64), 1.0
    for k in range(grid.n_steps):
        b = grid.beta_dt(k)
        x = x + b * 0.5 * x + math.sqrt(b) * noise[k]
        growth *= 1 + b / 2
    displacement = x  # started at 0
    eps = toy.wiener_eps(noise, grid)
    ratio = displacement / eps
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-10, atol=0)
    # e^{2 gamma} - 1, up to the left-point grid's O(h) bias (~1 % at h = 1e-3)
    assert float(ratio[0]) ** 2 == pytest.approx(math.expm1(2 * toy.vp_gamma(0.1)), rel=2e-2)
    assert abs(float(eps.mean())) < 0.05 and float(eps.var()) == pytest.approx(1.0, abs=0.06)


def test_flip_ever_is_the_running_minimum_below_zero():
    # Prop. 1's flip: the path crosses 0 somewhere; compared with an explicit Euler loop (lam = 0)
    grid = toy.ReverseGrid.from_dt(toy.T_STAR, 5e-3)
    noise = torch.randn(grid.n_steps, 3000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res = toy.simulate(0.0, 0.0, noise, dt=5e-3)
    score = toy.toy_mixture()
    x = torch.full((3000, 1), toy.X_START, dtype=torch.float64)
    lowest = x[:, 0].clone()
    for k in range(grid.n_steps):
        b, t = grid.beta_dt(k), grid.t(k)
        x = x + b * (0.5 * x + score(x, torch.full((3000,), t, dtype=torch.float64))) + math.sqrt(b) * noise[k]
        lowest = torch.minimum(lowest, x[:, 0])
    torch.testing.assert_close(res["x_final"], x[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res["x_min"], lowest, rtol=1e-10, atol=1e-12)
    final, ever = float((res["x_final"] < 0).double().mean()), float((res["x_min"] < 0).double().mean())
    assert ever > final + 0.1  # crossing and coming back is common from x = 0.2


# --- an unwritable out_dir fails before any compute; finished cells survive an interruption


def test_unwritable_out_fails_before_any_compute(tmp_path, monkeypatch, capsys):
    from coup_fast.paper.cli import main as paper_main

    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(toy, "simulate", lambda *a, **k: pytest.fail("computed before out_dir was checked"))
    with pytest.raises(ValueError, match="^out_dir .*file.txt/sub.*cannot create"):
        toy.run_toy(str(tmp_path / "file.txt" / "sub"), n_paths=10, progress=False)
    assert paper_main(["toy", "--out", str(tmp_path / "file.txt"), "--n-paths", "10", "--no-progress"]) == 2
    assert "error: --out" in capsys.readouterr().err


@pytest.mark.parametrize("grids,name", [(dict(c_grid=(0.0, 1e308)), "c_grid"), (dict(lam_grid=(1.0, -1.0)), "lam_grid"),
                                        (dict(lam_grid=(float("nan"),)), "lam_grid"), (dict(c_grid=()), "c_grid"),
                                        (dict(c_grid="12"), "c_grid")])
def test_grids_are_checked(grids, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        toy.run_toy(None, n_paths=10, progress=False, **grids)


def test_interrupted_toy_study_resumes_from_its_finished_cells(tmp_path, monkeypatch):
    settings = dict(n_paths=300, c_grid=(0.0, 2.0), lam_grid=(0.0, 1.0), dt=5e-3, progress=False)
    want = toy.run_toy(None, **settings)
    real, calls = toy.simulate, []

    def counting(stop_at):
        def simulate(*a, **k):
            calls.append(a[:2])
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real(*a, **k)
        return simulate

    with monkeypatch.context() as patch:
        patch.setattr(toy, "simulate", counting(2))
        with pytest.raises(KeyboardInterrupt):
            toy.run_toy(str(tmp_path), **settings)
    assert len(list((tmp_path / "cells").iterdir())) == 1  # the shared lam = 0 column, written when done
    calls.clear()
    monkeypatch.setattr(toy, "simulate", counting(0))
    r = toy.run_toy(str(tmp_path), **settings)
    assert calls == [(0.0, 1.0), (2.0, 1.0)]  # only the cells not yet done
    assert r["rows"] == want["rows"] and r["prop2"] == want["prop2"]
    assert not (tmp_path / "cells").exists()  # removed once toy.csv/json/png are written
    calls.clear()
    other = toy.run_toy(str(tmp_path), **{**settings, "n_paths": 200})  # another study: nothing reused
    assert len(calls) == 3 and other["setup"]["n_paths"] == 200

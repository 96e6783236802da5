"""purify's rows= and attacks.ImageDraws: an image draws the same numbers whichever other images share its batch
(what lets an evaluation attack only the images still standing and agree with the full schedule image by image)."""
import pytest
import torch

from coup_fast import PurifiedClassifier, purify
from coup_fast.attacks import ImageDraws
from problems import analytic_problem, neural_problem

CASES = [("coup", "exact"), ("reverse", "exact"), ("diffpure", "exact"), ("coup", "adjoint"), ("diffpure", "adjoint"),
         ("likelihood-max", "exact")]


def _problem(mode):
    if mode == "likelihood-max":  # an eps-network on the DDPM index and a classifier: the tiny neural problem
        score, clf = neural_problem(torch.float64)
        return score, clf, torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    score, clf = analytic_problem(d=5, dtype=torch.float64)
    return score, clf, torch.rand(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode,gradient", CASES)
def test_a_subset_of_the_batch_gets_exactly_its_rows_noise_and_gradient(mode, gradient):
    score, clf, x = _problem(mode)
    ids = torch.tensor([4, 0, 3])
    kw = dict(t_star=0.05, dt=0.01, lam=1.0, mode=mode, gradient=gradient, samples=2)
    if mode == "likelihood-max":
        kw = dict(mode=mode, lam=1.0, samples=2)
    xf = x.clone().requires_grad_(True)
    full = purify(xf, score, clf, generator=torch.Generator().manual_seed(5), rows=(torch.arange(6), 6), **kw)
    xs = x[ids].clone().requires_grad_(True)
    part = purify(xs, score, clf, generator=torch.Generator().manual_seed(5), rows=(ids, 6), **kw)
    rows_of = torch.cat([ids, ids + 6])  # sample r of the full call holds rows r B .. (r + 1) B - 1
    torch.testing.assert_close(part, full[rows_of], rtol=1e-12, atol=1e-12)
    w = torch.randn(full.shape, dtype=full.dtype, generator=torch.Generator().manual_seed(2))
    (g_full,) = torch.autograd.grad((full * w).sum(), xf)
    (g_part,) = torch.autograd.grad((part * w[rows_of]).sum(), xs)
    torch.testing.assert_close(g_part, g_full[ids], rtol=1e-10, atol=1e-12)
    if mode != "likelihood-max":  # (Adam's sign-like steps make the tiny LM problem's output draw-independent)
        # without rows= the subset would have drawn other noise: the test can tell
        other = purify(x[ids], score, clf, generator=torch.Generator().manual_seed(5), **kw)
        assert (other - full[rows_of]).abs().max() > 1e-9


def test_likelihood_maxs_draws_for_a_subset_are_the_batchs_at_its_rows():
    from coup_fast.lm import LMConfig, LMDraws

    like, ids = torch.zeros(6, 1, 4, 4), torch.tensor([4, 0, 3])
    full = LMDraws(like, LMConfig(), seed=9).as_tensors()
    part = LMDraws(like[:3], LMConfig(), seed=9, rows=(ids, 6)).as_tensors()
    plain = LMDraws(like[:3], LMConfig(), seed=9).as_tensors()
    for f, p, q in zip(full, part, plain):  # t (M, K, B) and eps (M, K, B, ...)
        assert torch.equal(p, f[:, :, ids]) and not torch.equal(q, f[:, :, ids])


def test_the_whole_batch_as_rows_draws_what_purify_draws_without_them():
    score, clf, x = _problem("diffpure")
    kw = dict(t_star=0.05, dt=0.01, mode="diffpure", generator=None)
    plain = purify(x, score, clf, **{**kw, "generator": torch.Generator().manual_seed(3)})
    rows = purify(x, score, clf, **{**kw, "generator": torch.Generator().manual_seed(3)}, rows=(torch.arange(6), 6))
    torch.testing.assert_close(rows, plain, rtol=1e-12, atol=1e-12)  # the fused step and the explicit one agree


@pytest.mark.parametrize("rows", [([0, 0, 1], 6), ([0, 1, 6], 6), ([0, 1], 6), ([0.0, 1.0, 2.0], 6), ([0, 1, 2], 0),
                                  "rows"])
def test_bad_rows_name_the_argument(rows):
    score, clf, x = _problem("coup")
    with pytest.raises(ValueError, match="^rows: expected"):
        purify(x[:3], score, clf, t_star=0.05, dt=0.01, rows=rows)


def test_a_purified_classifier_with_rows_draws_other_sizes_as_their_own_batch():
    """AutoAttack calls the model on the subsets it forms: such a call cannot carry the stage's rows."""
    score, clf, x = _problem("coup")
    model = PurifiedClassifier(score, clf, t_star=0.05, dt=0.01, rows=(torch.tensor([1, 2, 5]), 6),
                               generator=torch.Generator().manual_seed(0))
    assert model(x[:3]).shape == (3, clf(x[:1]).shape[1]) and model(x[:2]).shape[0] == 2


def test_image_draws_are_the_full_batchs_draws_at_the_images_rows():
    like = torch.zeros(6, 1, 3, 3)
    full = ImageDraws(7, torch.arange(6), 6)
    part = ImageDraws(7, torch.tensor([5, 2]), 6)
    for draw in ("rand_like", "randn_like", "rand_like"):  # successive draws differ, and agree row by row
        a, b = getattr(full, draw)(like), getattr(part, draw)(like[:2])
        torch.testing.assert_close(b, a[[5, 2]], rtol=0, atol=0)
    assert not torch.equal(ImageDraws(7, torch.arange(6), 6).rand_like(like), ImageDraws(8, torch.arange(6), 6).rand_like(like))

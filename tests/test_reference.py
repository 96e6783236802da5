"""purify against the independent torchsde path, on the same Brownian path."""
import pytest
import torch

from coup_fast import purify
from coup_fast.reference import brownian_interval, noise_from_brownian, purify_torchsde
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


def test_torchsde_adjoint_gradient_approximates_the_exact_one():
    score, clf = analytic_problem(d=4, dtype=torch.float64)
    x = (0.3 + 0.4 * torch.rand(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    x.requires_grad_()
    grads = {}
    for gradient in ("exact", "adjoint", "detached-guidance"):
        out = purify(x, score, clf, gradient=gradient, generator=torch.Generator().manual_seed(2))
        (grads[gradient],) = torch.autograd.grad((out * torch.arange(4.0, dtype=torch.float64)).sum(), x)
    rel = {g: ((grads[g] - grads["exact"]).norm() / grads["exact"].norm()).item() for g in ("adjoint", "detached-guidance")}
    # torchsde's continuous adjoint is close to the exact discrete one, and closer than a gradient
    # without the guidance's Hessian term: an adjoint that dropped it would fail here
    assert rel["adjoint"] < 0.02 and rel["adjoint"] < rel["detached-guidance"] / 2, rel

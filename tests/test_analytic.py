import torch

from coup_fast.guidance import confidence_grad
from problems import analytic_problem


def test_mixture_score_is_gradient_of_diffused_log_density():
    gmm, _ = analytic_problem(d=5, dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    for t in (0.0, 0.05, 0.6):
        (grad,) = torch.autograd.grad(gmm.log_prob(x, t).sum(), x)
        assert torch.allclose(gmm(x, torch.full((7,), t, dtype=torch.float64)), grad, atol=1e-10, rtol=1e-10)


def test_mixture_density_at_time_zero_is_the_data_density():
    gmm, _ = analytic_problem(d=2, dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    manual = torch.zeros(3, dtype=torch.float64)
    for mu, s, lw in zip(gmm.means, gmm.stds, gmm.log_weights):
        dist = torch.distributions.Normal(mu, s)
        manual += torch.exp(lw + dist.log_prob(x).sum(-1))
    assert torch.allclose(gmm.log_prob(x, 0.0), manual.log(), atol=1e-12)


def test_linear_classifier_closed_form_guidance_and_hessian():
    _, clf = analytic_problem(d=4, dtype=torch.float64)
    x = torch.rand(3, 4, dtype=torch.float64) * 2 - 1
    assert torch.allclose(clf.confidence_grad(x), confidence_grad(clf, x), atol=1e-12)
    hess = clf.confidence_hessian(x)
    for i in range(3):
        h = torch.autograd.functional.hessian(
            lambda v: torch.log_softmax(clf((v + 1) / 2)[None], -1).max(), x[i:i + 1].reshape(1, 4))
        assert torch.allclose(hess[i], h.reshape(4, 4), atol=1e-12)

"""coup_fast.attacks.diffhammer: the E-step and the choice of the grafted path against the paper's formulas on a
hand-sized case, the replay of the chosen paths, and grafting against the ungrafted gradient through every path."""
import math

import pytest
import torch
import torch.nn.functional as F

from coup_fast import PurifiedClassifier
from coup_fast.attacks import AttackSettings, run_attack
from coup_fast.attacks.diffhammer import Paths, _objective, choose_paths, em_weights
from coup_fast.lm import LMConfig, index_eps_model
from problems import neural_problem

F64 = torch.float64
LOSSES = [-1.0, 0.2, 0.7]  # three paths of one image: at eps = 1, or without the elu, another path wins
GRADS = [[-1.7, -1.9], [-1.3, 1.3], [0.1, -0.1]]


def _elu(z):
    return z if z > 0 else math.exp(z) - 1


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


def _unit(g, norm):
    if norm == "Linf":
        return [math.copysign(1.0, v) if v else 0.0 for v in g]
    size = math.sqrt(sum(v * v for v in g))
    return [v / size for v in g]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_em_on_a_hand_sized_case_follows_the_papers_formulas(norm):
    """Eq. 11: phi^ = argmax_j sum_i elu(L_i + eps u(g_j).g_i); E-step q_i = sigmoid(lam (L_i + u(g_phi^).g_i)),
    M-step weights q_i / sum q; written out in plain Python floats."""
    eps, lam = 0.1, 5.0
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    scores = [sum(_elu(LOSSES[i] + eps * dot(_unit(GRADS[j], norm), GRADS[i])) for i in range(3)) for j in range(3)]
    chosen = max(range(3), key=lambda j: scores[j])
    q = [_sigmoid(lam * (LOSSES[i] + dot(_unit(GRADS[chosen], norm), GRADS[i]))) for i in range(3)]
    want = [v / sum(q) for v in q]

    losses = torch.tensor(LOSSES, dtype=F64).view(3, 1)
    grads = torch.tensor(GRADS, dtype=F64).view(3, 1, 2)
    got = choose_paths(losses, grads, eps, norm)
    assert got.tolist() == [chosen]
    torch.testing.assert_close(em_weights(losses, grads, got, lam, norm).view(-1), torch.tensor(want, dtype=F64),
                               rtol=1e-12, atol=0)


def test_e_step_weights_do_not_underflow():
    losses = torch.tensor([[-200.0], [-300.0]], dtype=F64)  # sigmoid(5 z) underflows to 0 for both paths
    grads = torch.zeros(2, 1, 3, dtype=F64)
    w = em_weights(losses, grads, torch.tensor([0]), 5.0, "Linf")
    torch.testing.assert_close(w.sum(0), torch.ones(1, dtype=F64))
    assert w[0, 0] > 0.999  # exp(5 * 100) times the other's share


def _models(score, clf):
    kw = dict(t_star=0.1, dt=0.05)
    return {"coup": PurifiedClassifier(score, clf, mode="coup", **kw),
            "diffpure": PurifiedClassifier(score, clf, mode="diffpure", **kw),
            "coup@detached-guidance": PurifiedClassifier(score, clf, mode="coup", gradient="detached-guidance", **kw),
            "reverse@adjoint": PurifiedClassifier(score, clf, mode="reverse", gradient="adjoint", **kw),
            "coup-lm": PurifiedClassifier(index_eps_model(score), clf, mode="likelihood-max", lm=LMConfig(n_steps=2))}


@pytest.mark.parametrize("name", ["coup", "diffpure", "coup@detached-guidance", "reverse@adjoint", "coup-lm"])
def test_grafting_replays_each_images_chosen_path(name):
    """graft(x, chosen, v) is J_{chosen[b]}(x)^T v_b per image: the gradient through the very path the batched
    purification drew (here from autograd through all N paths at once, the upstream on the chosen rows only)."""
    score, clf = neural_problem(dtype=F64)
    model = _models(score, clf)[name]
    n = 3
    x = 0.2 + 0.6 * torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    chosen = torch.tensor([2, 0, 2, 1])
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    paths = Paths(model)
    torch.manual_seed(11)
    images = paths.sample(x, n)
    after = torch.get_rng_state()
    grafted = paths.graft(x, chosen, upstream)
    assert torch.equal(torch.get_rng_state(), after)  # replaying draws nothing new

    torch.manual_seed(11)
    xr = x.clone().requires_grad_(True)
    every = model.purify(xr, samples=n)  # all N paths with their gradient
    rows = torch.zeros_like(every).view(n, *x.shape)
    rows[chosen, torch.arange(4)] = upstream
    (want,) = torch.autograd.grad(every, xr, rows.view_as(every))
    torch.testing.assert_close(images, every.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grafted, want, rtol=1e-9, atol=1e-12)


def _linear_purifier(mode):
    """A purifier whose paths share their Jacobian: the score of N(0, I), s(x, t) = -x, no guidance, so every path is
    the same affine map plus its own noise (t* small: nothing reaches the clamp)."""
    _, clf = neural_problem(dtype=F64)
    return PurifiedClassifier(lambda x, t: -x, clf, t_star=0.02, dt=0.01, mode=mode, lam=0.0), clf


@pytest.mark.parametrize("mode", ["reverse", "diffpure"])
def test_grafting_equals_the_ungrafted_em_gradient_when_the_paths_share_the_jacobian(mode):
    """Eq. 10: sum_i q_i J_i^T g_i = J^T sum_i q_i g_i when J_i = J.  The ungrafted side is autograd through every
    path of the q-weighted losses; the grafted side one backward through the chosen path."""
    model, clf = _linear_purifier(mode)
    x = 0.4 + 0.2 * torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = torch.tensor([1, 2, 3])
    n = 4
    paths = Paths(model)
    torch.manual_seed(5)
    images = paths.sample(x, n).requires_grad_(True)
    assert 0 < images.min() and images.max() < 1  # the clamp is inactive: the Jacobian is the same on every path
    with torch.enable_grad():
        losses = F.cross_entropy(clf(images), y.repeat(n), reduction="none")
        (grads,) = torch.autograd.grad(losses.sum(), images)
    losses, flat = losses.detach().view(n, -1), grads.view(n, 3, -1)
    chosen = choose_paths(losses, flat, 0.1, "Linf")
    weights = em_weights(losses, flat, chosen, 5.0, "Linf")
    grafted = paths.graft(x, chosen, (weights.unsqueeze(-1) * flat).sum(0).view_as(x))

    torch.manual_seed(5)
    xr = x.clone().requires_grad_(True)
    every = clf(model.purify(xr, samples=n))
    weighted = (weights.reshape(-1) * F.cross_entropy(every, y.repeat(n), reduction="none")).sum()
    (ungrafted,) = torch.autograd.grad(weighted, xr)
    torch.testing.assert_close(grafted, ungrafted, rtol=1e-10, atol=1e-13)


def test_grafting_differs_from_the_ungrafted_gradient_when_the_jacobians_differ():
    """The identity above is not automatic: on a nonlinear purifier the two sides differ."""
    score, clf = neural_problem(dtype=F64)
    model = PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="coup", lam=3.0)
    x = 0.2 + 0.6 * torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    paths = Paths(model)
    torch.manual_seed(5)
    paths.sample(x, 2)
    one = paths.graft(x, torch.tensor([0, 0, 0]), upstream)
    other = paths.graft(x, torch.tensor([1, 1, 1]), upstream)
    assert not torch.allclose(one, other, rtol=1e-3)


def test_stepwise_em_mixes_the_gradients():
    """Algorithm 1, line 14: g_t = t^-alpha g + (1 - t^-alpha) g_{t-1}, t counting the objective's calls."""
    _, clf = neural_problem()
    y = torch.tensor([0, 1])
    points = [torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    mixed = _objective(Paths(clf), y, "ce", 0.1, "Linf", 3, 0.5, 5.0)
    fresh = [_objective(Paths(clf), y, "ce", 0.1, "Linf", 3, 0.5, 5.0)(p)[1] for p in points]
    got = [mixed(p)[1] for p in points]
    want = fresh[0]
    torch.testing.assert_close(got[0], want)
    for t in (2, 3):
        want = t ** -0.5 * fresh[t - 1] + (1 - t ** -0.5) * want
        torch.testing.assert_close(got[t - 1], want)


def test_a_randomized_model_without_paths_is_refused():
    class Noisy(torch.nn.Module):
        randomized = True

        def forward(self, x):
            return torch.randn(x.shape[0], 5)

    with pytest.raises(ValueError, match="^model: DiffHammer"):
        run_attack("diffhammer", Noisy(), torch.rand(1, 1, 4, 4), torch.tensor([0]),
                   settings=AttackSettings(diffhammer_iter=1))

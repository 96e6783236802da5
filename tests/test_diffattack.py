"""coup_fast.attacks.diffattack: DiffAttack's objective (L_cls + lambda L_dev over the reverse states) and its
gradient against plain float64 autograd through an unrolled loop with the references written out."""
import pytest
import torch
import torch.nn.functional as F

from coup_fast import PurifiedClassifier, purify
from coup_fast.attacks import AttackSettings, diffattack_candidates, run_attack
from coup_fast.attacks.diffattack import _objective, dev_steps, has_states
from coup_fast.lm import index_eps_model
from coup_fast.sde import ReverseGrid, vp_alpha, vp_sigma
from problems import neural_problem, step_noise
from test_states import DT, LAM, N, T_STAR, unrolled

F64 = torch.float64


class FixedDraws:
    """A purified classifier whose every call uses the same explicit draws (so the oracle can replay them)."""

    def __init__(self, score, clf, mode, noise, gradient="exact", memory="lean"):
        self.score, self.classifier, self.noise = score, clf, noise
        self.purify_kwargs = dict(t_star=T_STAR, dt=DT, lam=LAM, mode=mode, gradient=gradient, memory=memory)

    def purify(self, x, samples=1, states=None):
        assert samples == 1
        return purify(x, self.score, self.classifier, noise=self.noise, states=states, **self.purify_kwargs)

    def sample_logits(self, x, samples):
        return self.classifier(self.purify(x, samples))


def _oracle(u, y, score, clf, mode, noise, ks, lam):
    """L_cls + lam L_dev per image, by autograd through every step, with the diffusion process's samples written
    from the known draw eps = noise[0]: x_t = alpha(t)(2u - 1) + sigma(t) eps (DiffPure), 2u - 1 (COUP, reverse)."""
    images, states = unrolled(u, score, clf, mode=mode, noise=noise, ks=ks)
    grid = ReverseGrid.from_dt(T_STAR, DT)
    dev = 0.0
    for j, k in enumerate(ks):
        t = 0.0 if k == grid.n_steps else grid.t(k)
        ref = vp_alpha(t) * (2 * u - 1) + vp_sigma(t) * noise[0] if mode == "diffpure" else 2 * u - 1
        dev = dev + ((states[j] - ref) ** 2).flatten(1).mean(1)
    return F.cross_entropy(clf(images), y, reduction="none") + lam * dev / len(ks)


@pytest.mark.parametrize("mode", ["coup", "reverse", "diffpure"])
@pytest.mark.parametrize("memory", ["lean", "fast"])
def test_objective_and_gradient_equal_unrolled_autograd(mode, memory):
    score, clf = neural_problem(dtype=F64)
    u = 0.2 + 0.6 * torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    y = torch.tensor([0, 3, 1])
    noise = step_noise(N + (mode == "diffpure"), u.shape)
    loss, grad, acc = _objective(FixedDraws(score, clf, mode, noise, memory=memory), y, "ce", 1, None, 0.7, None)(u)
    ur = u.clone().requires_grad_(True)
    want = _oracle(ur, y, score, clf, mode, noise, tuple(range(1, N + 1)), 0.7)
    (want_grad,) = torch.autograd.grad(want.sum(), ur)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    assert ((grad - want_grad).norm() / want_grad.norm()).item() <= 1e-10
    # the deviation term is there: without it the gradient is another one
    _, plain, _ = _objective(FixedDraws(score, clf, mode, noise), y, "ce", 1, None, 0.0, None)(u)
    assert not torch.allclose(plain, grad, rtol=1e-3, atol=0)


def test_subset_of_steps_and_dlr_round():
    score, clf = neural_problem(dtype=F64)
    u = 0.2 + 0.6 * torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = torch.tensor([2, 4])
    noise = step_noise(N + 1, u.shape)
    loss, grad, _ = _objective(FixedDraws(score, clf, "diffpure", noise), y, "dlr", 1, None, 1.0, 2)(u)
    ur = u.clone().requires_grad_(True)
    images, states = unrolled(ur, score, clf, mode="diffpure", noise=noise, ks=dev_steps(N, 2))
    want = _oracle(ur, y, score, clf, "diffpure", noise, dev_steps(N, 2), 1.0)
    want = want - F.cross_entropy(clf(images), y, reduction="none")  # the DLR round: swap the classification loss
    from pyautoattack.autopgd_base import APGDAttack

    want = want + APGDAttack.dlr_loss(None, clf(images), y)
    (want_grad,) = torch.autograd.grad(want.sum(), ur)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    assert ((grad - want_grad).norm() / want_grad.norm()).item() <= 1e-10


def test_dev_steps_are_evenly_spaced_and_end_at_the_output():
    assert dev_steps(5) == (1, 2, 3, 4, 5) == dev_steps(5, 9)
    assert dev_steps(10, 3) == (3, 7, 10) and dev_steps(100, 1) == (100,)
    assert len(dev_steps(100, 33)) == 33


def test_models_without_states_run_on_the_classification_loss():
    score, clf = neural_problem()
    kw = dict(t_star=0.1, dt=0.05)
    assert has_states(PurifiedClassifier(score, clf, mode="coup", **kw))
    assert has_states(PurifiedClassifier(score, clf, mode="diffpure", gradient="bpda", **kw))
    assert not has_states(clf)
    assert not has_states(PurifiedClassifier(score, clf, mode="coup", gradient="adjoint", **kw))
    lm = PurifiedClassifier(index_eps_model(score), clf, mode="likelihood-max")
    assert not has_states(lm)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    torch.manual_seed(0)
    advs = diffattack_candidates(lm, x, y, eps=0.1, n_iter=2, eot=2)
    assert set(advs) == {"ce-best", "ce-max-loss", "dlr-best", "dlr-max-loss"}
    assert all((a - x).abs().max() <= 0.1 + 1e-6 for a in advs.values())


def test_eot_chunks_give_the_same_attack():
    """The EOT draws batched or one purify call each: the same draws, the same candidates (to round-off)."""
    score, clf = neural_problem()
    model = PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="diffpure")
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    out = []
    for chunk in (None, 1):
        torch.manual_seed(4)
        out.append(run_attack("diffattack", model, x, y, eps=0.1, settings=AttackSettings(
            diffattack_iter=3, diffattack_eot=3, eot_chunk=chunk)))
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=0, atol=1e-5)

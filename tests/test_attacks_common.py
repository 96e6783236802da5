"""coup_fast.attacks.common: the losses against their published definitions, the stated subgradients on bounds and
ties, and AutoPGD's steps against pyautoattack's."""
import pytest
import torch
import torch.nn.functional as F

from coup_fast.attacks import (AttackSettings, apgd_ascent, attack_loss, clip, dlr_loss, eot_loss_grad, margin_loss,
                               pgd_eot_candidates, project, run_attack, to_box)
from problems import neural_problem


def _autoattack_dlr(logits, y):
    """Croce & Hein's DLR as pyautoattack computes it (APGDAttack.dlr_loss), the published reference."""
    from pyautoattack.autopgd_base import APGDAttack

    return APGDAttack.dlr_loss(None, logits, y)


def _cw_margin(logits, y):
    """Carlini & Wagner's margin as DiffHammer's code writes it (utils.cw_loss): max over the other classes,
    the true one pushed down by 1e5."""
    onehot = F.one_hot(y, logits.shape[1])
    return (logits - 1e5 * onehot).max(1)[0] - (logits * onehot).sum(1)


def test_losses_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([1, 0, 0])
    # margin: max_{j != y} z_j - z_y
    torch.testing.assert_close(margin_loss(logits, y), torch.tensor([2.0 - 3.0, 1.0 - 5.0, 4.0 - 1.0]))
    # DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    want = torch.tensor([-(3.0 - 2.0) / (3.0 - 1.0), -(5.0 - 1.0) / (5.0 - 0.0), -(1.0 - 4.0) / (4.0 - 2.0)])
    torch.testing.assert_close(dlr_loss(logits, y), want)
    torch.testing.assert_close(attack_loss("ce", logits, y), F.cross_entropy(logits, y, reduction="none"))
    with pytest.raises(ValueError, match="^loss:"):
        attack_loss("hinge", logits, y)
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss(logits[:, :2], torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("name,reference", [("margin", _cw_margin), ("dlr", _autoattack_dlr)])
def test_losses_and_gradients_equal_the_published_implementations(name, reference):
    """Untied random logits: values and autograd gradients equal pyautoattack's DLR and DiffHammer's CW margin."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    mine, ref = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    value, want = attack_loss(name, mine, y), reference(ref, y)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
    weights = torch.rand(64, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * value).sum(), mine)
    (ref_grad,) = torch.autograd.grad((weights * want).sum(), ref)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_loss_subgradients_at_ties_are_the_stated_ones():
    """Tied logits: the gradient goes to the first maximal class (margin) and follows the stable descending order
    (DLR), whatever torch's max or sort would pick."""
    logits = torch.tensor([[2.0, 2.0, 0.0], [3.0, 3.0, 1.0]], requires_grad=True)
    y = torch.tensor([2, 0])
    (g,) = torch.autograd.grad(margin_loss(logits, y).sum(), logits)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]))
    logits = torch.tensor([[3.0, 3.0, 1.0, 0.0]], requires_grad=True)  # y = 0 tied with class 1
    (g,) = torch.autograd.grad(dlr_loss(logits, torch.tensor([0])).sum(), logits)
    # order (0, 1, 2, 3): DLR = -(z0 - z1) / (z0 - z2); at z0 = z1 its gradient is -(e0 - e1) / (z0 - z2)
    torch.testing.assert_close(g, torch.tensor([[-0.5, 0.5, 0.0, 0.0]]))


def test_eot_gradient_of_each_loss_is_the_published_losss():
    _, clf = neural_problem()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for name, reference in (("margin", _cw_margin), ("dlr", _autoattack_dlr),
                            ("ce", lambda z, t: F.cross_entropy(z, t, reduction="none"))):
        grad, _ = eot_loss_grad(clf, x, y, 3, loss=name)  # a deterministic model: its 3 draws are equal
        xr = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(reference(clf(xr), y).sum(), xr)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["margin", "dlr"])
def test_pgd_eot_with_a_margin_loss_fools_a_bare_classifier(loss):
    _, clf = neural_problem()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = clf(x).argmax(1)
    torch.manual_seed(0)
    advs = run_attack("pgd-eot", clf, x, y, eps=0.3, settings=AttackSettings(pgd_iter=10, pgd_eot=1, loss=loss))
    with torch.no_grad():
        correct = torch.stack([clf(a).argmax(1) == y for a in advs.values()]).all(0)
    assert correct.float().mean() <= 0.5
    assert all((a - x).abs().max() <= 0.3 + 1e-6 for a in advs.values())


def test_settings_refuse_bad_new_values_naming_the_flag():
    with pytest.raises(ValueError, match="^--loss:"):
        AttackSettings(loss="hinge")
    with pytest.raises(ValueError, match="^--diffhammer-n:"):
        AttackSettings(diffhammer_n=0)
    with pytest.raises(ValueError, match="^--diffattack-steps:"):
        AttackSettings(diffattack_steps=0)
    with pytest.raises(ValueError, match="^--diffattack-lambda:"):
        AttackSettings(diffattack_lambda=float("nan"))


# ------------------------------------------------------------------------------------- subgradients on bounds
def test_clip_is_clamp_with_pass_through_on_the_bounds():
    v = torch.tensor([-2.0, -1.0, -0.5, 0.0, 1.0, 1.5], requires_grad=True)
    out = clip(v, -1.0, 1.0)
    assert torch.equal(out, v.detach().clamp(-1.0, 1.0))
    (g,) = torch.autograd.grad(out.sum(), v)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # exactly on a bound: 1 (inside), on every torch


def test_projections_with_iterates_exactly_on_the_bounds():
    eps = 0.25
    x = torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.75]])
    delta = torch.tensor([[0.0, 0.0, eps, -eps, 2 * eps]], requires_grad=True)  # box faces, ball faces, outside
    (g,) = torch.autograd.grad(project(delta, "Linf", eps).sum(), delta)
    assert g.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    (g,) = torch.autograd.grad(to_box(x, delta).sum(), delta)
    assert g.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]  # x + delta = 0, 1 (on the box), 0.75, 0.25, 1.25 (outside)
    assert torch.equal(project(delta, "Linf", eps), delta.detach().clamp(-eps, eps))
    # L2: on the sphere the projection is the identity (Jacobian I); outside it is eps delta / ||delta||
    on = torch.tensor([[eps, 0.0]], requires_grad=True)
    jac = torch.stack([torch.autograd.grad(project(on, "L2", eps)[0, i], on)[0][0] for i in range(2)])
    assert jac.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    out = torch.tensor([[2 * eps, 0.0]], requires_grad=True)
    jac = torch.stack([torch.autograd.grad(project(out, "L2", eps)[0, i], out)[0][0] for i in range(2)])
    torch.testing.assert_close(jac, torch.tensor([[0.0, 0.0], [0.0, 0.5]]))  # (eps/||d||)(I - u u^T)
    zero = torch.zeros(1, 2, requires_grad=True)
    (g,) = torch.autograd.grad(project(zero, "L2", eps).sum(), zero)
    assert torch.isfinite(g).all() and g.tolist() == [[1.0, 1.0]]


# ------------------------------------------------------------------------------------------- AutoPGD's steps
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_apgd_ascent_takes_pyautoattacks_steps(norm, eps):
    """apgd_ascent with the cross-entropy of a deterministic classifier is pyautoattack's APGD: the same random start
    (same RNG calls), steps, checkpoints and restarts to x_best, so the same x_best and best loss."""
    from pyautoattack.autopgd_base import APGDAttack

    _, clf = neural_problem()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = clf(x).argmax(1)
    queried = []

    class Recording(torch.nn.Module):
        def forward(self, v):
            queried.append(v.detach().clone())
            return clf(v)

    reference = APGDAttack(Recording(), n_iter=12, eps=eps, norm=norm, seed=0, device="cpu")
    reference.init_hyperparam(x)
    torch.manual_seed(7)
    x_best, _, loss_best, _ = reference.attack_single_run(x.clone(), y.clone())
    theirs, queried = queried, []

    def objective(v):
        v = v.clone().requires_grad_(True)
        queried.append(v.detach().clone())
        with torch.enable_grad():
            logits = clf(v)
            loss = F.cross_entropy(logits, y, reduction="none")
            (g,) = torch.autograd.grad(loss.sum(), v)
        return loss.detach(), g, (logits.argmax(1) == y).float()

    torch.manual_seed(7)
    found = apgd_ascent(objective, x, y, norm=norm, eps=eps, n_iter=12)
    assert len(queried) == len(theirs) == 13  # the start and every iterate, the same points
    for mine, ref in zip(queried, theirs):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(found["max-loss"], x_best, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(F.cross_entropy(clf(found["max-loss"]), y, reduction="none"), loss_best,
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(found["max-loss"], x)  # it moved


def test_pgd_best_rule_is_shared_and_unchanged():
    """pgd_eot_candidates' 'best' still ranks by accuracy then loss with the chosen loss (a smoke check that
    the loss reaches the ranking: a different loss may pick a different iterate, never one outside the ball)."""
    _, clf = neural_problem()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = clf(x).argmax(1)
    for loss in ("ce", "margin", "dlr"):
        torch.manual_seed(0)
        out = pgd_eot_candidates(clf, x, y, eps=0.2, n_iter=4, eot=1, loss=loss)
        assert (out["best"] - x).abs().max() <= 0.2 + 1e-6 and out["best"].min() >= 0 and out["best"].max() <= 1

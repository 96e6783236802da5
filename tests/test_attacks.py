"""Attacks: projections, PGD+EOT, BPDA, AutoAttack through pyautoattack, on tiny models."""
import dataclasses

import pytest
import torch

from coup_fast import PurifiedClassifier
from coup_fast.attacks import (ATTACKS, AttackSettings, eot_grad, pgd_eot, project, run_attack, with_gradient)
from problems import neural_problem

SMALL = AttackSettings(n_iter=3, eot=2, fab_iter=3, square_queries=10, n_target_classes=2, pgd_iter=3, pgd_eot=2,
                       bpda_iter=3, bpda_eot=2)


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def _purified(**kw):
    score, clf = neural_problem()
    return PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, **kw), clf


def _norms(d, norm):
    return d.flatten(1).abs().amax(1) if norm == "Linf" else d.flatten(1).norm(dim=1)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_project_into_ball(norm):
    d = 3 * torch.randn(5, 1, 4, 4)
    p = project(d, norm, 0.3)
    assert (_norms(p, norm) <= 0.3 + 1e-6).all()
    small = 0.01 * d / _norms(d, norm).view(-1, 1, 1, 1)  # already inside: unchanged
    torch.testing.assert_close(project(small, norm, 0.3), small)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_pgd_stays_in_ball_and_hurts_a_bare_classifier(norm, eps):
    _, clf = neural_problem()
    x, _ = _data(32)
    y = clf(x).argmax(1)  # all clean-correct
    x_adv = pgd_eot(clf, x, y, norm=norm, eps=eps, n_iter=10, eot=1)
    assert (_norms(x_adv - x, norm) <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    assert ce(clf(x_adv), y) > ce(clf(x), y) + 1e-3


def test_eot_grad_is_the_mean_of_independent_draws():
    model, _ = _purified(mode="reverse")
    x, y = _data(3)
    torch.manual_seed(5)
    g2 = eot_grad(model, x, y, 2)
    torch.manual_seed(5)
    singles = [eot_grad(model, x, y, 1) for _ in range(2)]
    torch.testing.assert_close(g2, (singles[0] + singles[1]) / 2)
    assert not torch.allclose(singles[0], singles[1])  # fresh noise on every call


def test_with_gradient_switches_only_the_backward():
    model, clf = _purified(lam=1.0)
    bpda = with_gradient(model, "bpda")
    assert isinstance(bpda, PurifiedClassifier) and bpda.purify_kwargs["gradient"] == "bpda"
    assert bpda.purify_kwargs["t_star"] == 0.1 and with_gradient(clf, "bpda") is clf


@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("aa-standard", "aa-rand")])  # 'aa' runs both
def test_every_attack_runs_and_respects_the_threat_model(name):
    model, _ = _purified(mode="coup" if name == "bpda-eot" else "reverse")
    x, y = _data(2)
    torch.manual_seed(0)
    advs = run_attack(name, model, x, y, norm="Linf", eps=0.05, seed=1, settings=SMALL)
    assert len(advs) == (2 if name == "aa" else 1)
    for a in advs:
        assert a.shape == x.shape and (a - x).abs().max() <= 0.05 + 1e-5 and a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("aa-standard", "aa-rand")])
def test_every_attack_fools_a_bare_classifier(name):
    # a deterministic model, all images clean-correct: every attack (BPDA's straight-through on a model
    # without purifier is plain PGD) must misclassify some (APGD keeps only successful perturbations)
    _, clf = neural_problem()
    x, _ = _data(8)
    y = clf(x).argmax(1)
    torch.manual_seed(0)
    settings = dataclasses.replace(SMALL, bpda_iter=10)  # BPDA's paper-scaled step needs more than 3 steps
    advs = run_attack(name, clf, x, y, norm="Linf", eps=0.3, seed=1, settings=settings)
    with torch.no_grad():
        for a in advs:
            assert (clf(a).argmax(1) == y).float().mean() <= 0.625, name


def test_attacks_are_reproducible_from_the_seed():
    model, _ = _purified(mode="reverse")
    x, y = _data(2)
    out = []
    for _ in range(2):
        torch.manual_seed(3)
        out.append(run_attack("apgd-ce", model, x, y, norm="L2", eps=0.5, seed=3, settings=SMALL)[0])
    torch.testing.assert_close(out[0], out[1])


def test_unknown_attack_and_norm_name_the_field():
    _, clf = neural_problem()
    x, y = _data(2)
    with pytest.raises(ValueError, match="attack"):
        run_attack("fgsm", clf, x, y)
    with pytest.raises(ValueError, match="threat"):
        run_attack("apgd-ce", clf, x, y, norm="L1")


@pytest.mark.parametrize("version", ["rand", "standard"])
def test_autoattack_apgd_schedule_follows_the_iteration_budget(version):
    # APGD's step-size checkpoints come from n_iter at construction: they must match an APGD
    # built with the budget we ask for, not AutoAttack's default 100 iterations
    from pyautoattack.autopgd_base import APGDAttack

    from coup_fast.attacks import build_autoattack

    _, clf = neural_problem()
    adversary = build_autoattack(clf, version=version, eps=0.1, settings=AttackSettings(n_iter=5), device="cpu")
    fresh = APGDAttack(clf, n_iter=5, eps=0.1, device="cpu")
    apgds = [adversary.apgd] + ([adversary.apgd_targeted] if version == "standard" else [])
    for apgd in apgds:
        assert (apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == \
            (5, fresh.n_iter_2, fresh.n_iter_min, fresh.size_decr)


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_bpda_default_step_scales_with_eps(monkeypatch, norm, eps):
    # the paper's 0.007 at Linf 8/255; a fixed 0.007 could not reach an L2 ball of radius 0.5 in 20 steps
    import coup_fast.attacks as attacks

    seen = {}
    monkeypatch.setattr(attacks, "pgd_eot", lambda *a, **kw: seen.update(kw))
    attacks.run_attack("bpda-eot", None, None, None, norm=norm, eps=eps)
    assert seen["step"] == pytest.approx(0.007 * eps / (8 / 255))
    assert seen["n_iter"] * seen["step"] >= eps

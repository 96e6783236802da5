"""Attacks: projections, PGD+EOT and its candidates, batched EOT (ours and pyautoattack's), BPDA, AutoAttack
through pyautoattack, the gradient-consistency measure; on tiny models."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coup_fast import PurifiedClassifier
from coup_fast.attacks import (ATTACKS, AttackSettings, BatchedEOT, candidate_count, eot_grad, eot_loss_grad,
                               gradient_consistency, per_draw_gradients, pgd_eot, pgd_eot_candidates, project,
                               run_attack, with_gradient)
from coup_fast.lm import LMConfig, index_eps_model
from problems import neural_problem

SMALL = AttackSettings(n_iter=3, eot=2, fab_iter=3, square_queries=10, n_target_classes=2, pgd_iter=3, pgd_eot=2,
                       bpda_iter=3, bpda_eot=2, diffattack_iter=3, diffattack_eot=2, diffhammer_iter=3, diffhammer_n=3)
CANDIDATES = {"aa": {"standard", "rand"}, "apgd-ce": {"adv", "max-loss"}, "pgd-eot": {"final", "best"},
              "bpda-eot": {"final", "best"}, "diffattack": {"ce-best", "ce-max-loss", "dlr-best", "dlr-max-loss"},
              "diffhammer": {f"{loss}-{kind}" for loss in ("margin", "ce", "dlr") for kind in ("best", "max-loss")}}
ROOT = Path(__file__).resolve().parent.parent


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


def _lm_purified(lam=1.0):
    score, clf = neural_problem()
    return PurifiedClassifier(index_eps_model(score), clf, mode="likelihood-max", lam=lam, lm=LMConfig(n_steps=2))


@pytest.mark.parametrize("make", [lambda: _purified(mode="coup", lam=1.0)[0], lambda: _purified(mode="diffpure")[0],
                                  lambda: _purified(mode="coup", gradient="detached-guidance")[0], _lm_purified],
                         ids=["coup", "diffpure", "detached-guidance", "coup-lm"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_batched_eot_equals_the_sequential_calls(make, chunk):
    """K draws in one batch (or chunks of 2 of K = 5) give the sequential calls' mean gradient and logits, to
    round-off: the same K seeds from the same RNG, in order."""
    model = make()
    x, y = _data(3)
    torch.manual_seed(11)
    g_seq, logits_seq = eot_loss_grad(model, x, y, 5, chunk=1)  # chunk 1: one purify call per draw
    torch.manual_seed(11)
    g_bat, logits_bat = eot_loss_grad(model, x, y, 5, chunk=chunk)
    torch.testing.assert_close(logits_bat, logits_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_bat, g_seq, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(logits_seq[0], logits_seq[1])  # the draws differ


def _apgd_pattern(model, x, y, eot):
    """pyautoattack's EOT loop (autopgd_base.APGDAttack.attack_single_run), written out."""
    x_adv = x.clone().requires_grad_()
    grad = torch.zeros_like(x)
    for _ in range(eot):
        with torch.enable_grad():
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y, reduction="none").sum()
        grad += torch.autograd.grad(loss, [x_adv])[0].detach()
    return grad / eot, logits.detach()


@pytest.mark.parametrize("chunk", [None, 3])
def test_batched_eot_wrapper_serves_pyautoattacks_loop(chunk):
    model, _ = _purified(mode="coup")
    x, y = _data(3)
    torch.manual_seed(2)
    g_seq, last_seq = _apgd_pattern(model, x, y, 4)
    torch.manual_seed(2)
    wrapped = BatchedEOT(model, 4, chunk)
    g_bat, last_bat = _apgd_pattern(wrapped, x, y, 4)
    wrapped.check_finished()
    torch.testing.assert_close(g_bat, g_seq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(last_bat, last_seq, rtol=1e-5, atol=1e-5)  # the last draw's logits, APGD's check
    with torch.no_grad():  # evaluation calls go straight to the model
        torch.manual_seed(4)
        a = wrapped(x)
        torch.manual_seed(4)
        torch.testing.assert_close(a, model(x))


def test_apgd_with_the_wrapper_runs_the_sequential_attack():
    from pyautoattack.autopgd_base import APGDAttack

    model, _ = _purified(mode="coup")
    x, y = _data(4)
    outs = []
    for m in (model, BatchedEOT(model, 3)):
        attack = APGDAttack(m, n_iter=4, eps=0.1, norm="Linf", eot_iter=3, seed=0, device="cpu")
        attack.init_hyperparam(x)
        torch.manual_seed(9)
        outs.append(attack.attack_single_run(x.clone(), y.clone()))
    for a, b in zip(outs[0], outs[1]):  # x_best, acc, loss_best, x_best_adv
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)


def test_the_wrapper_refuses_a_broken_eot_pattern():
    model, _ = _purified(mode="coup")
    x, y = _data(2)
    wrapped = BatchedEOT(model, 3)
    xr = x.clone().requires_grad_()
    loss = F.cross_entropy(wrapped(xr), y)
    (g,) = torch.autograd.grad(loss, xr)  # one of three backward passes: zeros so far, the sum is deferred
    assert (g == 0).all()
    with pytest.raises(RuntimeError, match="BatchedEOT"):
        wrapped(x.clone().requires_grad_())  # a new tensor before the other two calls: the sum would be lost
    with pytest.raises(RuntimeError, match="BatchedEOT"):
        wrapped.check_finished()


def test_with_gradient_switches_only_the_backward():
    model, clf = _purified(lam=1.0)
    bpda = with_gradient(model, "bpda")
    assert isinstance(bpda, PurifiedClassifier) and bpda.purify_kwargs["gradient"] == "bpda"
    assert bpda.purify_kwargs["t_star"] == 0.1 and with_gradient(clf, "bpda") is clf

    class Own(torch.nn.Module):
        def with_gradient(self, gradient):
            return gradient

    assert with_gradient(Own(), "bpda") == "bpda"


@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("aa-standard", "aa-rand")])  # 'aa' runs both
def test_every_attack_runs_and_respects_the_threat_model(name):
    model, _ = _purified(mode="coup" if name == "bpda-eot" else "reverse")
    x, y = _data(2)
    torch.manual_seed(0)
    advs = run_attack(name, model, x, y, norm="Linf", eps=0.05, seed=1, settings=SMALL)
    assert len(advs) == candidate_count(name, SMALL)
    assert set(advs) == CANDIDATES[name]
    for a in advs.values():
        assert a.shape == x.shape and (a - x).abs().max() <= 0.05 + 1e-5 and a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("aa-standard", "aa-rand")])
def test_every_attack_fools_a_bare_classifier(name):
    # a deterministic model, all images clean-correct: every attack (BPDA's straight-through on a model
    # without purifier is plain PGD) must misclassify some, per image with its worst candidate
    _, clf = neural_problem()
    x, _ = _data(8)
    y = clf(x).argmax(1)
    torch.manual_seed(0)
    settings = dataclasses.replace(SMALL, bpda_iter=10)  # BPDA's paper-scaled step needs more than 3 steps
    advs = run_attack(name, clf, x, y, norm="Linf", eps=0.3, seed=1, settings=settings)
    with torch.no_grad():
        correct = torch.stack([clf(a).argmax(1) == y for a in advs.values()]).all(0)
    assert correct.float().mean() <= 0.625, name


def test_pgd_best_candidate_is_the_worst_iterate_seen():
    """'best' is, per image, the iterate whose EOT draws were right least often, ties by the higher loss: checked
    against every iterate the attack queried (recorded by a wrapper), recomputed independently."""
    _, clf = neural_problem()
    seen = []

    class Recording(torch.nn.Module):
        randomized = False

        def forward(self, u):
            seen.append(u.detach().clone())
            return clf(u)

    x, _ = _data(8)
    y = clf(x).argmax(1)
    torch.manual_seed(0)
    out = pgd_eot_candidates(Recording(), x, y, norm="Linf", eps=0.2, n_iter=6, eot=1)
    with torch.no_grad():
        wrong = torch.stack([(clf(u).argmax(1) != y).float() for u in seen])  # (iterates, B)
        loss = torch.stack([F.cross_entropy(clf(u), y, reduction="none") for u in seen])
    for i in range(x.shape[0]):
        (k,) = [k for k, u in enumerate(seen) if torch.equal(u[i], out["best"][i])][:1]  # one of the iterates
        assert wrong[k, i] == wrong[:, i].max()  # as often wrong as any
        assert loss[k, i] >= loss[wrong[:, i] == wrong[k, i], i].max() - 1e-5  # and of the highest loss among those
    assert not torch.equal(out["final"], out["best"])  # the last iterate is not the best on every image


def test_attacks_are_reproducible_from_the_seed():
    model, _ = _purified(mode="reverse")
    x, y = _data(2)
    out = []
    for _ in range(2):
        torch.manual_seed(3)
        out.append(run_attack("apgd-ce", model, x, y, norm="L2", eps=0.5, seed=3, settings=SMALL))
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name])


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
    assert isinstance(adversary.model, BatchedEOT) == (version == "rand")  # rand's EOT calls are served batched


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_bpda_default_step_scales_with_eps(monkeypatch, norm, eps):
    # the paper's 0.007 at Linf 8/255; a fixed 0.007 could not reach an L2 ball of radius 0.5 in 20 steps
    import coup_fast.attacks as attacks

    seen = {}
    monkeypatch.setattr(attacks.pgd, "pgd_eot_candidates", lambda *a, **kw: seen.update(kw))
    attacks.run_attack("bpda-eot", None, None, None, norm=norm, eps=eps)
    assert seen["step"] == pytest.approx(0.007 * eps / (8 / 255))
    assert seen["n_iter"] * seen["step"] >= eps


def test_protocol_step_scales_with_eps(monkeypatch):
    import coup_fast.attacks as attacks

    seen = {}
    monkeypatch.setattr(attacks.pgd, "pgd_eot_candidates", lambda *a, **kw: seen.update(kw))
    settings = AttackSettings(pgd_step_scale=0.007 / (8 / 255), pgd_random_start=False)
    attacks.run_attack("pgd-eot", None, None, None, norm="Linf", eps=16 / 255, settings=settings)
    assert seen["step"] == pytest.approx(0.014) and seen["random_start"] is False


def test_gradient_consistency_closed_forms():
    g = torch.randn(1, 3, 8)
    same = gradient_consistency(g.repeat(4, 1, 1))
    assert same["cosine"] == pytest.approx([1.0] * 3) and same["ratio"] == pytest.approx([1.0] * 3)
    eye = torch.eye(4).view(4, 1, 4)  # four orthogonal unit gradients of one image
    ortho = gradient_consistency(eye)
    assert ortho["cosine"] == pytest.approx([0.0]) and ortho["ratio"] == pytest.approx([0.5])  # 1 / sqrt(4)
    zero = gradient_consistency(torch.zeros(4, 2, 5))
    assert zero["zero"] == [True, True] and zero["ratio"] == [0.0, 0.0]


def test_per_draw_gradients_are_independent_draws():
    model, clf = _purified(mode="coup")
    x, y = _data(3)
    torch.manual_seed(0)
    grads = per_draw_gradients(model, x, y, 4)
    assert grads.shape == (4, *x.shape) and not torch.allclose(grads[0], grads[1])
    plain = per_draw_gradients(clf, x, y, 3)  # a deterministic model: every draw is its gradient
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(clf(xr), y, reduction="sum"), xr)
    torch.testing.assert_close(plain, want.expand(3, *x.shape))


def test_bench_eot_quick_runs_and_reports_the_ratio():
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_eot.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "torch threads 1" in out and "sequential" in out and "batched" in out and "x faster" in out
    for attack in ("pgd-eot", "bpda-eot", "apgd-eot"):
        assert attack in out

"""The new attacks as the evaluation runs them: the dry run's counts (coup_fast.plan.attack_work) equal the
purifications and gradients an attack and its R re-evaluations actually make, and evaluate() on the digits runs
DiffAttack, DiffHammer and PGD-EOT with a margin loss with resume, rank sharding and batched EOT."""
import dataclasses
import sys

import pytest
import torch

import coup_fast.attacks.diffhammer as diffhammer_module
import coup_fast.evaluate as ev
from coup_fast import PurifiedClassifier
from coup_fast.attacks import AttackSettings, run_attack
from coup_fast.data import load_digits
from coup_fast.evaluate import evaluate, reevaluate
from coup_fast.lm import LMConfig, index_eps_model
from coup_fast.models.digits import load_digits_models
from coup_fast.plan import BPDA, GRADIENT, PURIFY, attack_work
from problems import neural_problem

SMALL = AttackSettings(n_iter=2, apgd_eot=2, pgd_iter=2, pgd_eot=3, diffattack_iter=2, diffattack_eot=3,
                       diffhammer_iter=2, diffhammer_restarts=2, diffhammer_n=3)


@pytest.fixture
def counted(monkeypatch):
    """Every purification counted by draws (samples x B rows / B): with a gradient to the images, or without."""
    calls = {"grad": 0, "no grad": 0}
    purify_module = sys.modules["coup_fast.purify"]  # the module (coup_fast.purify is the function)
    real = purify_module.purify

    def counting(x, *args, **kw):
        calls["grad" if torch.is_grad_enabled() and x.requires_grad else "no grad"] += kw.get("samples", 1)
        return real(x, *args, **kw)

    monkeypatch.setattr(purify_module, "purify", counting)
    monkeypatch.setattr(diffhammer_module, "purify", counting)
    return calls


def _kinds(work):
    counts = {PURIFY: 0.0, GRADIENT: 0.0, BPDA: 0.0}
    for (kind, _), count in work.calls:
        counts[kind] += count
    return counts


@pytest.mark.parametrize("attack", ["diffattack", "diffhammer", "pgd-eot", "apgd-ce"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_plan_counts_the_calls_an_attack_makes(counted, attack, chunk):
    score, clf = neural_problem()
    model = PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse")
    settings = dataclasses.replace(SMALL, eot_chunk=chunk)
    x, y = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    candidates = run_attack(attack, model, x, y, eps=0.1, settings=settings)
    reevaluate(model, candidates, y, 4, chunk)
    kinds = _kinds(attack_work(attack, settings, 4, True, model))
    assert counted["grad"] == kinds[GRADIENT]  # one input gradient through the purifier per draw
    assert counted["no grad"] == kinds[PURIFY] + kinds[BPDA]  # forward purifications (and classifier backwards)


@pytest.mark.parametrize("kind", ["coup-lm", "reverse@adjoint"])
def test_diffhammer_replays_path_by_path_within_the_bound(counted, kind):
    score, clf = neural_problem()
    model = (PurifiedClassifier(index_eps_model(score), clf, mode="likelihood-max", lm=LMConfig(n_steps=2))
             if kind == "coup-lm" else PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse",
                                                          gradient="adjoint"))
    x, y = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    run_attack("diffhammer", model, x, y, eps=0.1, settings=SMALL)
    kinds = _kinds(attack_work("diffhammer", SMALL, 4, True, model))
    calls = SMALL.diffhammer_restarts * (SMALL.diffhammer_iter + 1)
    assert kinds[GRADIENT] == calls * SMALL.diffhammer_n  # the bound: every chosen path its own replay
    assert calls <= counted["grad"] <= kinds[GRADIENT]
    assert counted["no grad"] == kinds[BPDA]


# ------------------------------------------------------------------------------------------ evaluate() on digits
EVAL = dataclasses.replace(SMALL, loss="margin", diffhammer_restarts=3)
ATTACKS = ["diffattack", "diffhammer", "pgd-eot"]


def _digits():
    score, clf = load_digits_models()
    x, y = load_digits("test", n=4, seed=0)
    models = {"none": clf, "diffpure": PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="diffpure"),
              "coup": PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="coup")}
    return models, x, y


def _run(models, x, y, out, settings=EVAL):
    return evaluate(models, x, y, attacks=ATTACKS, eps={"Linf": 0.15}, settings=settings, n_eval=3, batch_size=2,
                    out_dir=str(out), progress=False, diagnostics=False)


def test_new_attacks_evaluate_on_digits_and_resume(tmp_path):
    models, x, y = _digits()
    table = _run(models, x, y, tmp_path)
    for label in models:
        for attack in ATTACKS:
            cell = table.cells[(label, attack, "Linf")]
            assert cell["n"] == 4 and cell["runs"] == (1 if label == "none" else 3)
    records = sorted(tmp_path.rglob("batch*.json"))
    assert len(records) == 3 * (1 + len(ATTACKS)) * 2
    stamps = [p.stat().st_mtime_ns for p in records]
    again = _run(models, x, y, tmp_path)
    assert [p.stat().st_mtime_ns for p in records] == stamps and again.cells == table.cells  # resumed


def test_new_attacks_shard_over_ranks_and_batch_their_draws(tmp_path, monkeypatch):
    """Rank 1 then rank 0 of two (the records of the other rank read at the merge) give the single process's table;
    eot_chunk = 1 (one purify call per draw) gives the batched run's table."""
    models, x, y = _digits()
    models = {label: models[label] for label in ("none", "coup")}
    single = _run(models, x, y, tmp_path / "single")
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(ev, "_dist", lambda: (1, 2))
    with pytest.raises(RuntimeError, match="another rank's result record is missing"):
        _run(models, x, y, tmp_path / "ranks")  # its own records written, rank 0's not there yet
    monkeypatch.setattr(ev, "_dist", lambda: (0, 2))
    merged = _run(models, x, y, tmp_path / "ranks")
    assert merged.cells == single.cells
    monkeypatch.setattr(ev, "_dist", lambda: (0, 1))
    sequential = _run(models, x, y, tmp_path / "sequential", dataclasses.replace(EVAL, eot_chunk=1))
    for key, cell in single.cells.items():
        assert sequential.cells[key]["mean"] == pytest.approx(cell["mean"]), key

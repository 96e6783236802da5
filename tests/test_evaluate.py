"""evaluate(): clean/robust accuracy cells, R purifications (mean and worst case), seeding, outputs."""
import json

import pytest
import torch

from coup_fast import PurifiedClassifier
from coup_fast.attacks import AttackSettings
from coup_fast.evaluate import CLEAN, Defense, batch_seed, build_defense, evaluate
from problems import neural_problem


def _setup(n=6):
    score, clf = neural_problem()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = clf(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5  # some clean errors
    return score, clf, x, y


def test_clean_accuracy_of_a_bare_classifier_is_exact():
    score, clf, x, y = _setup()
    table = evaluate({"none": clf}, x, y, attacks=[], n_eval=3, batch_size=4, progress=False)
    cell = table.cells[("none", CLEAN, "Linf")]
    expected = 100.0 * (clf(x).argmax(1) == y).float().mean().item()
    assert cell == {"n": 6, "runs": 1, "mean": pytest.approx(expected), "worst": pytest.approx(expected)}


def test_randomized_defense_is_measured_R_times_and_worst_is_at_most_mean(tmp_path):
    score, clf, x, y = _setup()
    coup = PurifiedClassifier(score, clf, t_star=0.2, dt=0.05, mode="diffpure")
    table = evaluate({"dp": coup}, x, y, attacks=["apgd-ce"], eps={"Linf": 0.1}, n_eval=3, batch_size=4,
                     out_dir=str(tmp_path), progress=False, settings=AttackSettings(n_iter=2))
    for attack in (CLEAN, "apgd-ce"):
        c = table.cells[("dp", attack, "Linf")]
        assert c["runs"] == 3 and c["worst"] <= c["mean"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["attack"] for r in saved["rows"]} == {CLEAN, "apgd-ce"}
    assert "apgd-ce" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == "threat,eps,defense,attack,n,runs,mean,worst"
    # Second call with the same settings: every batch is read back, nothing recomputed.
    again = evaluate({"dp": coup}, x, y, attacks=["apgd-ce"], eps={"Linf": 0.1}, n_eval=3, batch_size=4,
                     out_dir=str(tmp_path), progress=False, settings=AttackSettings(n_iter=2))
    assert again.cells == table.cells


def test_cells_do_not_depend_on_what_else_runs():
    score, clf, x, y = _setup()
    rev = PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse")
    both = evaluate({"none": clf, "rev": rev}, x, y, attacks=[], n_eval=2, batch_size=3, progress=False)
    alone = evaluate({"rev": rev}, x, y, attacks=[], n_eval=2, batch_size=3, progress=False)
    assert both.cells[("rev", CLEAN, "Linf")] == alone.cells[("rev", CLEAN, "Linf")]
    assert batch_seed(0, ("a", "b", "c"), 1) != batch_seed(0, ("a", "b", "c"), 2)


def test_defense_specs():
    d = Defense.parse("coup@detached-guidance", t_star=0.075, dt=0.01)
    assert (d.name, d.gradient, d.t_star, d.label) == ("coup", "detached-guidance", 0.075, "coup@detached-guidance")
    assert Defense.parse("reverse", gradient="adjoint").label == "reverse@adjoint"
    with pytest.raises(ValueError, match="defenses"):
        Defense.parse("adv-train")
    with pytest.raises(ValueError, match="gradient"):
        Defense.parse("coup@bpda2")
    score, clf, _, _ = _setup()
    assert build_defense(Defense("none"), score, clf) is clf
    m = build_defense(Defense("diffpure", t_star=0.075, dt=0.025), score, clf)
    assert m.purify_kwargs["mode"] == "diffpure" and m.purify_kwargs["t_star"] == 0.075


def test_markdown_shows_mean_and_worst():
    score, clf, x, y = _setup()
    rev = PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse")
    md = evaluate({"rev": rev}, x, y, attacks=[], n_eval=2, batch_size=6, progress=False).to_markdown()
    assert "| rev |" in md and "(" in md and "R = 2" in md


def test_results_computed_with_other_weights_are_not_resumed(tmp_path):
    score, clf, x, y = _setup()
    kw = dict(attacks=[], n_eval=1, batch_size=4, out_dir=str(tmp_path), progress=False)
    before = evaluate({"none": clf}, x, y, **kw).cells[("none", CLEAN, "Linf")]
    c = min(range(5), key=lambda k: int((y == k).sum()))  # a class the new weights always predict
    with torch.no_grad():  # in place: same objects, other values
        clf.fc.weight.zero_()
        clf.fc.bias.zero_()
        clf.fc.bias[c] = 1.0
    after = evaluate({"none": clf}, x, y, **kw).cells[("none", CLEAN, "Linf")]
    expected = 100.0 * (y == c).float().mean().item()
    assert after["mean"] == pytest.approx(expected) and expected != pytest.approx(before["mean"])

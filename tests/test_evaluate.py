"""evaluate(): cells, candidates and Avg / Worst-of-R, the worst case over attacks x gradients, per-image files,
seeding, and the gradient-masking checks on a masked and an unmasked toy defense."""
import csv
import io
import json

import pytest
import torch

import coup_fast.evaluate as ev
from coup_fast import PurifiedClassifier, stats
from coup_fast.attacks import AttackSettings
from coup_fast.evaluate import ALL, CLEAN, Defense, batch_seed, build_defense, evaluate, select_worst, worst_label
from coup_fast.lm import LMConfig
from problems import neural_problem

TINY = AttackSettings(n_iter=3, eot=2, pgd_iter=3, pgd_eot=2, bpda_iter=3, bpda_eot=2)


def _setup(n=6):
    score, clf = neural_problem()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = clf(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5  # some clean errors
    return score, clf, x, y


def test_clean_accuracy_of_a_bare_classifier_is_exact():
    score, clf, x, y = _setup()
    table = evaluate({"none": clf}, x, y, attacks=[], n_eval=3, batch_size=4, progress=False, diagnostics=False)
    cell = table.cells[("none", CLEAN, "Linf")]
    correct = int((clf(x).argmax(1) == y).sum())
    assert (cell["n"], cell["runs"]) == (6, 1)  # deterministic: one evaluation, whatever R is
    assert cell["mean"] == cell["worst"] == pytest.approx(100.0 * correct / 6)
    lo, hi = stats.wilson_interval(correct, 6)
    assert (cell["worst_lo"], cell["worst_hi"]) == (pytest.approx(100 * lo, abs=1e-3), pytest.approx(100 * hi, abs=1e-3))


def test_randomized_defense_is_measured_R_times_and_worst_is_at_most_mean(tmp_path):
    score, clf, x, y = _setup()
    coup = PurifiedClassifier(score, clf, t_star=0.2, dt=0.05, mode="diffpure")
    kw = dict(attacks=["apgd-ce"], eps={"Linf": 0.1}, n_eval=3, batch_size=4, out_dir=str(tmp_path), progress=False,
              settings=AttackSettings(n_iter=2), diag_images=2)
    table = evaluate({"dp": coup}, x, y, **kw)
    for attack in (CLEAN, "apgd-ce", ALL):
        c = table.cells[("dp", attack, "Linf")]
        assert c["runs"] == 3 and c["worst"] <= c["mean"]
        assert c["worst_lo"] <= c["worst"] <= c["worst_hi"] and c["mean_lo"] <= c["mean"] <= c["mean_hi"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["attack"] for r in saved["rows"]} == {CLEAN, "apgd-ce", ALL}
    assert "apgd-ce" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == (
        "threat,eps,defense,group,attack,n,of,conditional,upper_bound,runs,mean,mean_lo,mean_hi,mv,mv_lo,mv_hi,worst,"
        "worst_lo,worst_hi,checks")
    # Second call with the same settings: every record is read back, nothing recomputed.
    again = evaluate({"dp": coup}, x, y, **kw)
    assert again.cells == table.cells and again.diagnostics == table.diagnostics


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
    assert Defense.parse("coup@bpda").gradient == "bpda"
    with pytest.raises(ValueError, match="defenses"):
        Defense.parse("adv-train")
    with pytest.raises(ValueError, match="gradient"):
        Defense.parse("coup@bpda2")
    with pytest.raises(ValueError, match="^defenses: 'lm@adjoint'"):  # the published attack is an SDE adjoint
        Defense.parse("lm@adjoint")
    with pytest.raises(ValueError, match="^defenses: expected a defense name"):
        Defense.parse(3)
    score, clf, _, _ = _setup()
    assert build_defense(Defense("none"), score, clf) is clf
    m = build_defense(Defense("diffpure", t_star=0.075, dt=0.025), score, clf)
    assert m.purify_kwargs["mode"] == "diffpure" and m.purify_kwargs["t_star"] == 0.075
    lm = build_defense(Defense("lm", lam=2.0, lm=LMConfig(n_steps=3)), score, clf)
    coup_lm = build_defense(Defense("coup-lm", lam=2.0, gradient="bpda"), score, clf)
    assert (lm.purify_kwargs["mode"], lm.purify_kwargs["lam"], lm.purify_kwargs["lm"].n_steps) == ("likelihood-max", 0.0, 3)
    assert (coup_lm.purify_kwargs["lam"], coup_lm.purify_kwargs["gradient"]) == (2.0, "bpda")


def test_markdown_shows_the_worst_case_with_intervals():
    score, clf, x, y = _setup()
    rows = {"rev": PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse"),
            "rev@bpda": PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse", gradient="bpda")}
    md = evaluate(rows, x, y, attacks=["pgd-eot"], settings=TINY, n_eval=2, batch_size=6, progress=False,
                  diagnostics=False).to_markdown()
    assert "| **rev: worst case** |" in md and "| rev@bpda |" in md and "R = 2" in md
    assert "Worst-of-R" in md and "Avg" in md and "[" in md  # intervals


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


def test_select_worst_takes_the_fewest_correct_then_the_highest_loss():
    correct = torch.tensor([[[1, 1, 0], [1, 0, 0]],    # candidate 0: 2, 1, 0 correct of 2
                            [[0, 1, 0], [0, 1, 0]]]).bool()  # candidate 1: 0, 2, 0
    loss = torch.tensor([[0.1, 0.1, 0.3], [0.2, 0.2, 0.9]])
    assert select_worst(correct, loss).tolist() == [1, 0, 1]  # image 2: a tie on counts, candidate 1's loss is higher


class _Coin(torch.nn.Module):
    """A stochastic model: image i is classified correctly with probability x[i, 0, 0, 0] (label 0 vs 1)."""

    randomized = True

    def forward(self, x):
        right = torch.rand(x.shape[0]) < x[:, 0, 0, 0]
        return torch.nn.functional.one_hot(torch.where(right, 0, 1), 2).float()


def test_each_image_keeps_its_worst_candidate(monkeypatch):
    # candidate 'a' is right with probability 1, 1, 1, .5, .5, .5 on the six images; 'b' with 0, 0, 1, 1, 1, 1
    pa = torch.tensor([1.0, 1, 1, 0.5, 0.5, 0.5])
    pb = torch.tensor([0.0, 0, 1, 1, 1, 1])
    fill = lambda p: p.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()  # noqa: E731
    monkeypatch.setattr(ev, "run_attack", lambda *a, **k: {"a": fill(pa), "b": fill(pb)})
    x, y = fill(torch.ones(6)), torch.zeros(6, dtype=torch.long)
    table = evaluate({"coin": _Coin()}, x, y, attacks=["pgd-eot"], n_eval=10, batch_size=6, progress=False,
                     diagnostics=False)
    v = table.samples[("coin", "pgd-eot", "Linf")]
    k = v.correct.sum(0).tolist()
    assert v.candidate[:2] == ["b", "b"] and k[:2] == [0, 0] and k[2] == 10  # never right; right both ways
    assert v.candidate[3:] == ["a"] * 3 and all(1 <= c <= 9 for c in k[3:])  # seed-fixed draws of p = .5
    cell = table.cells[("coin", "pgd-eot", "Linf")]
    assert cell["worst"] == pytest.approx(100 / 6)  # only image 2 right in all ten
    assert cell["mean"] == pytest.approx(100 * sum(k) / 60)


def _gradient_rows(score, clf, **kw):
    base = dict(t_star=0.1, dt=0.05, mode="coup", lam=1.0)
    return {"coup" if g == "exact" else f"coup@{g}": PurifiedClassifier(score, clf, **base, gradient=g)
            for g in ("exact", "detached-guidance", "bpda")}


def test_worst_case_never_exceeds_any_row_and_is_recomputed_from_samples_csv(tmp_path):
    """Real attacks on a purified classifier attacked with three gradients: the worst-case row is at most every
    per-gradient row in every column, Avg and Worst-of-R, and the per-image file gives it back."""
    score, clf, x, y = _setup(8)
    models = {"none": clf, **_gradient_rows(score, clf)}
    table = evaluate(models, x, y, attacks=["apgd-ce", "pgd-eot", "bpda-eot"], eps={"Linf": 0.2}, settings=TINY,
                     n_eval=3, batch_size=5, progress=False, out_dir=str(tmp_path), diag_images=3, schedule_name="full")
    cells, worst = table.cells, worst_label("coup")
    for column in table.columns:
        for key in ("mean", "worst"):
            rows = [cells[(r, column, "Linf")][key] for r in ("coup", "coup@detached-guidance", "coup@bpda")]
            assert cells[(worst, column, "Linf")][key] <= min(rows) + 1e-9
    assert cells[(worst, ALL, "Linf")]["worst"] < cells[(worst, CLEAN, "Linf")]["worst"]  # the attacks did something
    # recompute from samples.csv alone: per image, the minimum of correct / runs over the group's lines
    lines = list(csv.DictReader(io.StringIO((tmp_path / "samples.csv").read_text())))
    per_image = {}
    for line in lines:
        if line["group"] == "coup":
            acc = int(line["correct"]) / int(line["runs"])
            per_image[int(line["image"])] = min(per_image.get(int(line["image"]), 1.0), acc)
    assert len(per_image) == 8
    assert 100 * sum(per_image.values()) / 8 == pytest.approx(cells[(worst, ALL, "Linf")]["mean"], abs=1e-3)
    assert 100 * sum(a == 1.0 for a in per_image.values()) / 8 == pytest.approx(cells[(worst, ALL, "Linf")]["worst"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert any(r["defense"] == worst and r["attack"] == ALL for r in saved["rows"])


def test_batched_evaluation_equals_sequential_calls(tmp_path):
    """eot_chunk = 1 (every EOT draw, pyautoattack's included, and every re-evaluation its own purify call) gives the
    batched run's table: the same draws in the same order.  The chunk is not in the resume hash: a run restarted
    with a smaller chunk (memory) keeps its finished records."""
    import dataclasses

    score, clf, x, y = _setup()
    models = _gradient_rows(score, clf)
    batched_settings = dataclasses.replace(TINY, apgd_eot=2)
    kw = dict(attacks=["pgd-eot", "apgd-ce"], eps={"Linf": 0.1}, n_eval=3, batch_size=6, progress=False, diag_images=2)
    batched = evaluate(models, x, y, settings=batched_settings, out_dir=str(tmp_path), **kw)
    sequential = evaluate(models, x, y, settings=dataclasses.replace(batched_settings, eot_chunk=1), **kw)
    assert batched.cells.keys() == sequential.cells.keys()
    for key, cell in batched.cells.items():
        assert sequential.cells[key]["mean"] == pytest.approx(cell["mean"]), key
        assert sequential.cells[key]["worst"] == pytest.approx(cell["worst"]), key
    records = sorted(tmp_path.rglob("batch*.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    evaluate(models, x, y, settings=dataclasses.replace(batched_settings, eot_chunk=1), out_dir=str(tmp_path), **kw)
    assert [p.stat().st_mtime_ns for p in records] == stamps  # resumed, not recomputed


# ------------------------------------------------------------------ gradient-masking checks on toy defenses
class _NoisyQuantized(torch.nn.Module):
    """A randomized toy defense: classifier(q(x + sigma z)).  quantize=True rounds to 5 grey levels, a step
    function whose gradient is 0 almost everywhere (gradient masking, Athalye et al. 2018, Sec. 4.1);
    gradient 'bpda' differentiates it as the identity (straight-through).  quantize=False: no masking."""

    randomized = True

    def __init__(self, clf, quantize: bool, gradient: str = "exact", sigma: float = 0.02):
        super().__init__()
        self.clf, self.quantize, self.gradient, self.sigma = clf, quantize, gradient, sigma

    def with_gradient(self, gradient):
        return _NoisyQuantized(self.clf, self.quantize, gradient, self.sigma)

    def forward(self, x):
        u = (x + self.sigma * torch.randn_like(x)).clamp(0, 1)
        if self.quantize:
            q = torch.round(u * 4) / 4
            u = u + (q - u).detach() if self.gradient == "bpda" else q
        return self.clf(u)


@pytest.mark.parametrize("masked", [True, False])
def test_masked_toy_defense_fires_the_checks_and_an_unmasked_one_does_not(masked):
    _, clf = neural_problem()
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = clf(torch.round(x * 4) / 4 if masked else x).argmax(1)  # right on the clean (quantized) images
    models = {"toy": _NoisyQuantized(clf, masked), "toy@bpda": _NoisyQuantized(clf, masked, "bpda")}
    table = evaluate(models, x, y, attacks=["pgd-eot"], eps={"Linf": 0.3},
                     settings=AttackSettings(pgd_iter=10, pgd_eot=2), n_eval=3, batch_size=16, progress=False,
                     diag_images=16, diag_draws=4)  # S compares rows on the diagnostic images, attacked by every row
    d = table.diagnostics[("toy", "Linf")]
    if masked:
        assert d["fired"] == ["G", "S", "E"], d
        assert d["consistency"]["zero_images"] == 16  # the quantizer's gradient is exactly zero
        assert table.marks(worst_label("toy"), "Linf") == "G,S,E" and "S" in table.marks("toy@bpda", "Linf")
        assert len(table.warnings()) == 3 and "⚠E" in table.to_markdown()
    else:
        assert d["fired"] == [] and table.warnings() == [], d
        assert d["consistency"]["cosine"] > 0.5 and d["large_eps"]["worst"] <= 10.0

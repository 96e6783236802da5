"""coup_fast.schedule: the cascade attacks only the images still standing and keeps the worst case's Worst-of-R
exact; its order; and the pilot that prices a run from measured survival and leaves its records to the real run."""
import glob
import json
import os

import pytest
import torch

from coup_fast import PurifiedClassifier
from coup_fast.attacks import AttackSettings
from coup_fast.cli import main as cli_main
from coup_fast.evaluate import evaluate
from coup_fast.schedule import STRENGTH, stage_order
from coup_fast.table import ALL, CLEAN, kept_verdicts, worst_label
from problems import neural_problem

TINY = AttackSettings(n_iter=2, eot=2, pgd_iter=3, pgd_eot=2, bpda_iter=2, bpda_eot=2)


def test_stage_order_puts_clean_first_and_then_the_cheapest_per_expected_break():
    costs = {("coup", "pgd-eot"): 40.0, ("coup", "apgd-ce"): 6.0, ("coup@bpda", "pgd-eot"): 12.0,
             ("coup", "bpda-eot"): 10.0, ("coup@bpda", "apgd-ce"): 2.0}
    order = stage_order(["coup", "coup@bpda"], ["pgd-eot", "apgd-ce", "bpda-eot"], lambda r, a: costs[(r, a)])
    assert order[0] == ("coup", CLEAN)
    assert ("coup@bpda", "bpda-eot") not in order  # an attack with its own gradient runs once, in the first row
    keys = [costs[s] / STRENGTH.get(s[1], 0.5) for s in order[1:]]
    assert keys == sorted(keys) and len(order) == 1 + len(costs)


def _setup(n=12):
    score, clf = neural_problem()
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    y = clf(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5  # some clean errors: the cascade drops them after the clean column
    base = dict(t_star=0.1, dt=0.05, lam=1.0)
    models = {"none": clf,
              "coup": PurifiedClassifier(score, clf, mode="coup", **base),
              "coup@bpda": PurifiedClassifier(score, clf, mode="coup", gradient="bpda", **base),
              "reverse": PurifiedClassifier(score, clf, mode="reverse", **base)}
    return models, x, y


def test_later_stages_attack_only_the_images_still_standing(tmp_path):
    models, x, y = _setup()
    table = evaluate(models, x, y, attacks=["pgd-eot", "bpda-eot"], eps={"Linf": 0.3}, settings=TINY, n_eval=3,
                     batch_size=6, progress=False, out_dir=str(tmp_path), diag_images=2)
    order = table.meta["order"]["coup (Linf)"]
    for batch in (0, 1):
        standing = set(range(6))
        always = {i for i in range(6) if 6 * batch + i < 2}
        for stage in order:
            row, attack = stage.split(":")
            (path,) = glob.glob(str(tmp_path / "batches" / "*" / "Linf" / f"{row}-*" / attack / f"batch{batch:05d}.json"))
            rec = json.loads(open(path).read())
            assert rec["images"] == sorted(standing | always)
            kept, _ = kept_verdicts(rec)  # (R, images): the worst candidate's R evaluations
            standing -= {i for i, ok in zip(rec["images"], kept.all(0).tolist()) if not ok}
    cell = table.cell(worst_label("coup"), ALL, "Linf")
    assert cell["upper_bound"] and not cell["conditional"] and cell["n"] == 12
    # one attack's column of the worst case covers the images every row attacked with it (not those another attack
    # broke first, which its later rows skipped)
    both = table.samples[("coup", "pgd-eot", "Linf")].attacked & table.samples[("coup@bpda", "pgd-eot", "Linf")].attacked
    column = table.cell(worst_label("coup"), "pgd-eot", "Linf")
    assert column["n"] == int(both.sum()) and not column["upper_bound"]
    robust = (table.samples[("coup", "pgd-eot", "Linf")].robust & table.samples[("coup@bpda", "pgd-eot", "Linf")].robust)
    assert column["worst"] == pytest.approx(100 * float(robust[both].double().mean()))


def test_cascade_and_full_find_the_same_worst_case_robust_images_with_fewer_gradients(tmp_path, capsys):
    """Every gradient of a purifier (exact, detached-guidance through coup's rows, bpda) and the attacks whose draws
    the evaluation controls image by image: the set of images robust in the worst case (Worst-of-R) is the same under
    both schedules, and the cascade computes fewer gradients."""
    models, x, y = _setup(16)
    kw = dict(attacks=["apgd-ce", "pgd-eot", "bpda-eot"], eps={"Linf": 0.25}, settings=TINY, n_eval=3, batch_size=8,
              progress=False, diag_images=2)
    full = evaluate(models, x, y, schedule_name="full", **kw)
    cascade = evaluate(models, x, y, schedule_name="cascade", **kw)
    for group in ("none", "coup", "reverse"):
        a = full.per_image(worst_label(group), ALL, "Linf")[1]
        b = cascade.per_image(worst_label(group), ALL, "Linf")[1]
        assert a.tolist() == b.tolist(), group
        assert full.cell(worst_label(group), ALL, "Linf")["worst"] == cascade.cell(worst_label(group), ALL, "Linf")["worst"]
    print(f"gradients computed: full {full.meta['gradients']:.0f}, cascade {cascade.meta['gradients']:.0f}")
    assert cascade.meta["gradients"] < full.meta["gradients"]


def test_a_pilot_prices_the_run_from_measured_survival_and_the_run_resumes_from_its_records(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["eval", "--n-images", "8", "--batch-size", "4", "--defenses", "none,reverse", "--attacks", "pgd-eot",
            "--dt", "0.05", "--pgd-iter", "1", "--pgd-eot", "2", "--n-eval", "2", "--diag-images", "1", "--device",
            "cpu", "--no-progress", "--out", str(out)]
    assert cli_main([*argv, "--pilot", "3"]) == 0
    report = capsys.readouterr().out
    assert "--pilot 3: batches 0..0 (4 images of 8" in report and "Priced full run on this device" in report
    assert "| reverse | Linf | reverse: pgd-eot |" in report and "upper bound" in report
    pilot_records = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "batches" / "*" / "*" / "*" / "*" / "*.json"))}
    assert pilot_records and all("batch00000" in p or "diagnostics" in p for p in pilot_records)
    assert cli_main(argv) == 0
    assert all(os.stat(p).st_mtime_ns == t for p, t in pilot_records.items()), "the pilot's records were recomputed"
    assert glob.glob(str(out / "batches" / "*" / "*" / "*" / "*" / "batch00001.json"))


@pytest.mark.parametrize("schedule", ["cascade", "full"])
def test_the_headline_gives_clean_and_robust_in_the_same_metrics(schedule):
    models, x, y = _setup(6)
    table = evaluate({"reverse": models["reverse"]}, x, y, attacks=["pgd-eot"], eps={"Linf": 0.2}, settings=TINY,
                     n_eval=3, batch_size=6, progress=False, diagnostics=False, schedule_name=schedule)
    head = table.headline().splitlines()[2]
    assert "Clean Avg" in head and "Clean Worst-of-R" in head and "Robust MV" in head


def test_a_stage_left_with_no_image_standing_runs_nothing_and_reads_as_empty(tmp_path):
    models, x, y = _setup(6)
    wrong = (y + 1) % 5  # every clean image misclassified: the cascade leaves the attacks nothing to attack
    table = evaluate({"reverse": models["reverse"]}, x, wrong, attacks=["pgd-eot"], eps={"Linf": 0.2}, settings=TINY,
                     n_eval=2, batch_size=3, progress=False, diagnostics=False, diag_images=0, out_dir=str(tmp_path))
    (path,) = glob.glob(str(tmp_path / "batches" / "*" / "Linf" / "reverse-*" / "pgd-eot" / "batch00000.json"))
    assert json.loads(open(path).read())["images"] == []
    cell = table.cell("reverse", "pgd-eot", "Linf")
    assert cell["n"] == 0 and cell["worst"] is None and "–" in table.to_markdown()
    assert table.cell("reverse", ALL, "Linf")["worst"] == 0.0
    again = evaluate({"reverse": models["reverse"]}, x, wrong, attacks=["pgd-eot"], eps={"Linf": 0.2}, settings=TINY,
                     n_eval=2, batch_size=3, progress=False, diagnostics=False, diag_images=0, out_dir=str(tmp_path))
    assert again.cells == table.cells  # the empty records resume like any other

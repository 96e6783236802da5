"""coup_fast.paper.sweep: accuracy against t* and lam (Sec. 5.4, Fig. 4), on tiny networks."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from coup_fast.paper import cli, sweep
from problems import neural_problem




def tiny_problem(n: int = 6):
    score, clf = neural_problem()
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = clf(x).argmax(1)
    return score, clf, x, y


def test_sweep_outputs(tmp_path):
    cfg = sweep.SweepConfig(data="digits", n_images=6, eps=0.1, dt=0.02, n_iter=2, batch_size=4,
                            t_grid=(0.02, 0.06), lam_grid=(0.0, 1.0), t_star=0.04, lam=1.0)
    r = sweep.run_sweep(cfg, str(tmp_path), problem=tiny_problem(), progress=False)
    assert [(row["axis"], row["t_star"], row["lam"]) for row in r["rows"]] == [
        ("t_star", 0.02, 1.0), ("t_star", 0.06, 1.0), ("lam", 0.04, 0.0), ("lam", 0.04, 1.0)]
    for row in r["rows"]:
        assert 0.0 <= row["robust_acc"] <= 1.0 and 0.0 <= row["clean_acc"] <= 1.0 and row["n"] == 6
    assert json.loads((tmp_path / "sweep.json").read_text())["config"]["t_grid"] == [0.02, 0.06]
    assert len((tmp_path / "sweep.csv").read_text().strip().splitlines()) == 5
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_point_runs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "accuracy_point", lambda *a, **k: calls.append((k["t_star"], k["lam"], k["engine"])) or
                        {"t_star": k["t_star"], "lam": k["lam"], "clean_acc": 1.0, "robust_acc": 0.5, "n": 1})
    cfg = sweep.SweepConfig(t_grid=(0.05, 0.1), lam_grid=(1.0, 2.0), t_star=0.1, lam=1.0, engine="compile")
    r = sweep.run_sweep(cfg, None, problem=tiny_problem(), progress=False)
    assert len(r["rows"]) == 4
    assert sorted(calls) == [(0.05, 1.0, "compile"), (0.1, 1.0, "compile"), (0.1, 2.0, "compile")]


def test_attack_lowers_accuracy_of_bare_setting():
    """A real attack budget finds something: eps 0.3 on random nets takes most of the accuracy."""
    score, clf, x, y = tiny_problem(8)
    row = sweep.accuracy_point(score, clf, x, y, t_star=0.02, lam=0.0, dt=0.01, eps=0.3, n_iter=5, batch_size=8)
    assert 0.0 <= row["robust_acc"] <= 1.0 and 0.0 <= row["clean_acc"] <= 1.0
    assert row["robust_acc"] < row["clean_acc"] - 0.2  # an attack that did nothing would leave them equal


def test_presets_and_cifar_flags():
    assert sweep.SweepConfig.preset("cifar10").eps == pytest.approx(8 / 255)
    assert sweep.SweepConfig.preset("digits", n_iter=3, dt=None).n_iter == 3
    with pytest.raises(ValueError, match="data"):
        sweep.SweepConfig.preset("mnist")
    with pytest.raises(ValueError, match="--cifar-dir"):
        sweep.load_problem("cifar10", score_ckpt="a", classifier_ckpt="b")
    assert cli.main(["sweep", "--data", "cifar10", "--no-progress"]) == 2  # missing flags: clean error


def test_cli_parses_all_commands():
    import argparse

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["paper", "sweep", "--data", "cifar10", "--cifar-dir", "d", "--score-ckpt", "s",
                           "--classifier-ckpt", "c", "--t-grid", "0.05,0.1", "--out", "o", "--engine", "compile"])
    assert a.t_grid == (0.05, 0.1) and a.cifar_dir == "d" and a.engine == "compile" and callable(a.func)
    a = parser.parse_args(["paper", "toy", "--n-paths", "10", "--c", "0,1"])
    assert a.c == (0.0, 1.0) and a.n_paths == 10
    a = parser.parse_args(["paper", "trajectory", "--lam", "2"])
    assert a.lam == 2.0 and a.data == "digits"


@pytest.mark.parametrize("argv,flag", [
    (["sweep", "--eps", "-0.15"], "--eps"),
    (["sweep", "--n-iter", "0"], "--n-iter"),
    (["sweep", "--n-images", "-3"], "--n-images"),
    (["sweep", "--t-grid", "0.1,1.5"], "--t-grid"),
    (["sweep", "--lam-grid", ","], "--lam-grid"),
    (["sweep", "--dt", "nan"], "--dt"),
    (["trajectory", "--eps", "-0.15"], "--eps"),
    (["trajectory", "--t-star", "0"], "--t-star"),
    (["toy", "--c=-1"], "--c"),
    (["toy", "--n-paths", "0"], "--n-paths"),
    (["toy", "--threads", "0"], "--threads"),
])
def test_paper_commands_reject_bad_values_before_any_work(argv, flag, capsys, tmp_path):
    from coup_fast.paper.cli import main as paper_main

    with pytest.raises(SystemExit) as e:
        paper_main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_paper_sweep_rejects_more_images_than_the_split_has(capsys, tmp_path):
    from coup_fast.paper.cli import main as paper_main

    assert paper_main(["sweep", "--n-images", "5000", "--out", str(tmp_path / "o")]) == 2
    assert "n_images: the digits test split has" in capsys.readouterr().err


class _Alternating(torch.nn.Module):
    """A stand-in purified classifier: image i is right on draws where (draw + i) is even (randomized)."""

    randomized = True

    def __init__(self, *a, **k):
        super().__init__()
        self.draw, self.kwargs = 0, k

    def forward(self, u):
        right = (torch.arange(u.shape[0]) + self.draw) % 2 == 0
        self.draw += 1
        return torch.nn.functional.one_hot(torch.where(right, 0, 1), 2).float()


def test_accuracy_point_reports_avg_and_worst_of_r_with_evals_intervals(monkeypatch):
    """Clean: each image right on every other draw, so Avg 1/2 and Worst-of-R 0; the attack's candidate is always
    wrong, so robust is 0 / 0.  The intervals are coup_fast.stats' (Korn-Graubard for Avg, Wilson for Worst-of-R),
    as eval reports them; the attacks run are the ones named, with the budgets given."""
    from coup_fast import stats

    seen = []

    def fake_run_attack(name, model, x, y, **k):
        seen.append((name, k["settings"].n_iter, k["settings"].apgd_eot, k["eps"]))
        return {"adv": x + 1.0, "other": x + 1.0}  # classified by `wrong` below

    class Model(_Alternating):
        def forward(self, u):
            out = super().forward(u)
            return torch.where((u > 0.5).flatten(1).any(1, keepdim=True), out.flip(1) * 0 + torch.tensor([0.0, 1.0]),
                               out)

    monkeypatch.setattr(sweep, "PurifiedClassifier", Model)
    monkeypatch.setattr(sweep.attacks, "run_attack", fake_run_attack)
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    row = sweep.accuracy_point(None, None, x, y, t_star=0.1, lam=1.0, dt=0.1, eps=0.1, n_iter=3, batch_size=4,
                               n_eval=2, eot=7, attack_names=("apgd-ce", "pgd-eot"))
    assert seen == [("apgd-ce", 3, 7, 0.1), ("pgd-eot", 3, 7, 0.1)]
    assert row["clean_acc"] == pytest.approx(0.5) and row["clean_worst"] == 0.0
    assert (row["clean_lo"], row["clean_hi"]) == pytest.approx(stats.mean_interval([0.5] * 4, 2))
    assert (row["clean_worst_lo"], row["clean_worst_hi"]) == pytest.approx(stats.wilson_interval(0, 4))
    assert row["robust_acc"] == 0.0 and row["robust_worst"] == 0.0 and row["pgd-eot_acc"] == 0.0
    assert row["n_eval"] == 2 and row["n"] == 4


def test_worst_case_over_attacks_is_evaluates_per_image_minimum(monkeypatch):
    """Two attacks that each break a different half of the images: each alone leaves 50 %, the worst case 0 %
    (per image over the attacks, as coup-fast eval's 'all attacks'), and each attack's candidate is the one its
    R purifications classify correctly least often (select_worst)."""
    def fake_run_attack(name, model, x, y, **k):
        half = torch.arange(x.shape[0]) % 2 == (0 if name == "apgd-ce" else 1)
        bad = torch.where(half.view(-1, 1, 1, 1), 1.0, 0.0).expand_as(x)
        return {"useless": x.clone(), "breaks-half": bad}

    class Model(torch.nn.Module):
        randomized = True

        def __init__(self, *a, **k):
            super().__init__()

        def forward(self, u):  # wrong exactly where the input was set to 1
            wrong = (u > 0.5).flatten(1).any(1)
            return torch.nn.functional.one_hot(wrong.long(), 2).float()

    monkeypatch.setattr(sweep, "PurifiedClassifier", Model)
    monkeypatch.setattr(sweep.attacks, "run_attack", fake_run_attack)
    x, y = torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
    row = sweep.accuracy_point(None, None, x, y, t_star=0.1, lam=1.0, dt=0.1, eps=0.1, n_iter=1, batch_size=4,
                               n_eval=3, attack_names=("apgd-ce", "pgd-eot"))
    assert row["apgd-ce_acc"] == 0.5 and row["pgd-eot_worst"] == 0.5
    assert row["robust_acc"] == 0.0 and row["robust_worst"] == 0.0 and row["clean_acc"] == 1.0


def test_protocols_and_flags_set_the_attacks_and_the_outputs_name_them(tmp_path):
    cfg = sweep.SweepConfig.preset("digits", protocol=("lee-kim",), n_eval=None)
    assert cfg.attacks == ("pgd-eot",) and cfg.budget["pgd_iter"] == 200 and cfg.budget["pgd_eot"] == 20
    assert cfg.attack_settings().pgd_iter == 200 and "PGD-EOT (200 it. x EOT 20)" in cfg.attack_description()
    flags_win = sweep.SweepConfig.preset("digits", protocol=("lee-kim",), attacks=("apgd-ce", "pgd-eot"))
    assert flags_win.attacks == ("apgd-ce", "pgd-eot") and "worst case over" in flags_win.attack_description()
    default = sweep.SweepConfig.preset("digits")
    assert default.attack_description().startswith("APGD-CE (10 it., EOT 1)") and "exact gradient" in \
        default.attack_description()
    for bad in (dict(attacks=("fgsm",)), dict(attacks=("apgd-ce", "apgd-ce")), dict(gradient="sign"),
                dict(defense="coup-lm", gradient="adjoint")):
        with pytest.raises(ValueError, match=f"^{next(iter(bad)) if 'attacks' in bad else 'gradient'}:"):
            sweep.SweepConfig(**bad)
    with pytest.raises(ValueError, match="^protocol:"):
        sweep.SweepConfig.preset("digits", protocol=("madry",))
    cfg = sweep.SweepConfig(**{**SMALL, "attacks": ("apgd-ce", "pgd-eot"), "budget": {"pgd_iter": 2, "pgd_eot": 2},
                               "n_eval": 2, "t_grid": (0.02,), "lam_grid": (1.0,)})
    r = sweep.run_sweep(cfg, str(tmp_path), problem=tiny_problem(), progress=False)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["attack"]["attacks"] == ["apgd-ce", "pgd-eot"] and saved["attack"]["gradient"] == "exact"
    assert "PGD-EOT (2 it. x EOT 2)" in saved["attack"]["description"] and saved["attack"]["settings"]["pgd_iter"] == 2
    row = r["rows"][0]
    assert row["robust_acc"] <= min(row["apgd-ce_acc"], row["pgd-eot_acc"]) + 1e-12
    assert row["robust_lo"] <= row["robust_acc"] <= row["robust_hi"]


def test_geometric_grids_get_a_log_axis():
    assert sweep.axis_scale((0.02, 0.05, 0.1, 0.2, 0.4)) == ("log",)  # the digits t* grid
    assert sweep.axis_scale((1, 2, 5, 10)) == ("log",)  # M
    assert sweep.axis_scale((0.0, 0.5, 1.0, 2.0, 5.0)) == ("symlog", 0.5)  # lam, 0 included
    assert sweep.axis_scale((0.025, 0.05, 0.075, 0.1, 0.125, 0.15)) == ("linear",)  # the CIFAR t* grid: arithmetic
    assert sweep.axis_scale((0.0, 1.0)) == ("linear",)


def test_paper_help_shows_every_default():
    import argparse

    parser = argparse.ArgumentParser()
    paper = cli.register(parser.add_subparsers(dest="command"))
    for name, sub in paper._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert "default" in (action.help or "").lower(), f"paper {name} {action.option_strings}"


# --- an unwritable --out fails before any compute; finished cells survive an interruption


SMALL = dict(data="digits", n_images=6, eps=0.1, dt=0.02, n_iter=2, batch_size=4, t_grid=(0.02, 0.06),
             lam_grid=(0.0, 1.0), t_star=0.04, lam=1.0)


def _no_compute(*a, **k):
    raise AssertionError("computed before the output directory was checked")


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_unwritable_out_fails_before_any_compute(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "sub" if where == "under_a_file" else tmp_path / "file.txt"
    monkeypatch.setattr(sweep, "accuracy_point", _no_compute)
    monkeypatch.setattr(sweep, "load_problem", _no_compute)
    with pytest.raises(ValueError, match="^out_dir .*file.txt"):
        sweep.run_sweep(sweep.SweepConfig(**SMALL), str(out), problem=tiny_problem(), progress=False)
    assert cli.main(["sweep", "--out", str(out), "--no-progress"]) == 2
    assert "error: --out" in capsys.readouterr().err


def test_read_only_out_fails_before_any_compute(tmp_path, monkeypatch):
    """Tests run as root, for whom a 0o555 folder is writable: os.access stands in for the permission."""
    import os as os_module

    monkeypatch.setattr(sweep, "accuracy_point", _no_compute)
    monkeypatch.setattr(os_module, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="^out_dir .*not writable"):
        sweep.run_sweep(sweep.SweepConfig(**SMALL), str(tmp_path / "o"), problem=tiny_problem(), progress=False)


def test_read_only_filesystem_fails_before_any_compute(tmp_path, monkeypatch, capsys):
    """A read-only mount refuses the probe file even to root (open raises EROFS)."""
    import errno

    import coup_fast.paper as paper

    def read_only_fs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sweep, "load_problem", _no_compute)
    monkeypatch.setattr(paper, "open", read_only_fs, raising=False)  # shadows the builtin in that module only
    assert cli.main(["sweep", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "error: --out" in capsys.readouterr().err
    with pytest.raises(ValueError, match="^--out .*cannot write a file in the output directory \\(Read-only"):
        paper.check_out_dir(str(tmp_path / "o"), arg="--out")


def test_an_output_name_taken_by_a_folder_is_refused_before_any_compute(tmp_path, monkeypatch):
    (tmp_path / "sweep.png").mkdir()
    monkeypatch.setattr(sweep, "accuracy_point", _no_compute)
    with pytest.raises(ValueError, match="sweep.png exists there and is not a regular file"):
        sweep.run_sweep(sweep.SweepConfig(**SMALL), str(tmp_path), problem=tiny_problem(), progress=False)


def _interrupting(fn, n, calls):
    """fn, counting its calls in `calls`; the n-th call raises KeyboardInterrupt (Ctrl-C mid-sweep)."""
    def wrapped(*args, **kwargs):
        calls.append((kwargs["t_star"], kwargs["lam"]))
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    return wrapped


def test_interrupted_sweep_resumes_from_its_finished_cells(tmp_path, monkeypatch):
    cfg, problem = sweep.SweepConfig(**SMALL), tiny_problem()
    want = sweep.run_sweep(cfg, None, problem=problem, progress=False)["rows"]
    real, calls = sweep.accuracy_point, []
    with monkeypatch.context() as patch:
        patch.setattr(sweep, "accuracy_point", _interrupting(real, 3, calls))
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(cfg, str(tmp_path), problem=problem, progress=False)
    cells = sorted(p.name for p in (tmp_path / "cells").iterdir())
    assert len(cells) == 2 and all(c.endswith(".json") for c in cells)  # each written as it finished
    calls.clear()
    monkeypatch.setattr(sweep, "accuracy_point", _interrupting(real, 0, calls))
    r = sweep.run_sweep(cfg, str(tmp_path), problem=problem, progress=False)
    assert len(calls) == 2  # only the two points that were not done
    assert r["rows"] == want  # resumed = uninterrupted, number for number
    assert sorted(os.listdir(tmp_path)) == ["sweep.csv", "sweep.json", "sweep.png"]  # cells gone once written


def _fake_point(calls):
    def point(*a, **k):
        calls.append((k["t_star"], k["lam"]))
        return {"t_star": k["t_star"], "lam": k["lam"], "clean_acc": 1.0, "clean_lo": 0.6, "clean_hi": 1.0,
                "robust_acc": 0.5, "robust_lo": 0.2, "robust_hi": 0.8, "robust_worst": 0.5, "robust_worst_lo": 0.2,
                "robust_worst_hi": 0.8, "n": 6, "n_eval": k["n_eval"], "eot": k["eot"]}
    return point


@pytest.mark.parametrize("change", ["config", "images", "weights"])
def test_cells_of_another_sweep_are_not_reused(tmp_path, monkeypatch, change):
    from coup_fast.paper import CELLS_DIR

    calls = []
    monkeypatch.setattr(sweep, "accuracy_point", _interrupting(_fake_point([]), 3, calls))
    cfg, problem = sweep.SweepConfig(**SMALL), tiny_problem()
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, str(tmp_path), problem=problem, progress=False)
    assert len(os.listdir(tmp_path / CELLS_DIR)) == 2
    score, clf, x, y = problem
    if change == "config":
        cfg = sweep.SweepConfig(**{**SMALL, "n_eval": 3})
    elif change == "images":
        problem = (score, clf, x.flip(0), y.flip(0))
    else:
        clf = copy.deepcopy(clf)
        with torch.no_grad():
            next(clf.parameters()).add_(1e-3)
        problem = (score, clf, x, y)
    calls.clear()
    monkeypatch.setattr(sweep, "accuracy_point", _interrupting(_fake_point([]), 0, calls))
    sweep.run_sweep(cfg, str(tmp_path), problem=problem, progress=False)
    assert len(calls) == 4  # every point recomputed
    assert len(os.listdir(tmp_path / CELLS_DIR)) == 2  # the other sweep's cells are left alone


def test_unreadable_cell_is_set_aside_and_recomputed(tmp_path, monkeypatch, capsys):
    from coup_fast.paper import CELLS_DIR

    calls = []
    monkeypatch.setattr(sweep, "accuracy_point", _interrupting(_fake_point([]), 2, calls))
    cfg, problem = sweep.SweepConfig(**SMALL), tiny_problem()
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, str(tmp_path), problem=problem, progress=False)
    (cell,) = (tmp_path / CELLS_DIR).iterdir()
    cell.write_text('{"key": "')  # truncated
    calls.clear()
    monkeypatch.setattr(sweep, "accuracy_point", _interrupting(_fake_point([]), 0, calls))
    sweep.run_sweep(cfg, str(tmp_path), problem=problem, progress=True)
    assert len(calls) == 4 and f"{cell}: unreadable cell" in capsys.readouterr().err
    assert (tmp_path / CELLS_DIR / f"{cell.name}.unreadable").read_text() == '{"key": "'  # kept, not deleted


@pytest.mark.parametrize("argv,flag", [
    (["toy", "--seed", "1e23"], "--seed"),
    (["toy", "--seed", "100000000000000000000000"], "--seed"),
    (["sweep", "--seed", "-1"], "--seed"),
    (["--seed", "1e23", "toy"], "--seed"),  # before the subcommand
    (["--seed", "1e23"], "--seed"),
    (["toy", "--c", "1e308"], "--c"),
    (["toy", "--lam", "0,1e7"], "--lam"),
    (["sweep", "--lam-grid", "1e300"], "--lam-grid"),
    (["trajectory", "--lam", "1e300"], "--lam"),
    (["toy", "--threads", "100000000000000000000"], "--threads"),
    (["sweep", "--dt", "1e-300"], "--dt"),
    (["trajectory", "--dt", "1e-9"], "--dt"),
    (["sweep", "--wrn-depth", "100000000000000000000"], "--wrn-depth"),
    (["sweep", "--wrn-depth", "27"], "--wrn-depth"),
    (["sweep", "--wrn-widen", "1000000"], "--wrn-widen"),
])
def test_paper_numbers_that_would_overflow_are_argparse_errors(argv, flag, capsys, tmp_path):
    from coup_fast.paper.cli import main as paper_main

    with pytest.raises(SystemExit) as e:
        paper_main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_common_flags_work_before_the_subcommand(tmp_path, monkeypatch):
    import coup_fast.paper.toy as toy

    seen = {}

    def fake_run_toy(out, **k):
        seen.update(out=out, **k)
        raise ValueError("stop")  # the CLI's error path: nothing to print

    monkeypatch.setattr(toy, "run_toy", fake_run_toy)
    out = str(tmp_path / "o")
    assert cli.main(["--seed", "7", "--out", out, "toy", "--n-paths", "5", "--no-progress"]) == 2
    assert seen["seed"] == 7 and seen["out"] == out and seen["progress"] is False
    assert cli.main(["toy", "--no-progress"]) == 2 and seen["seed"] == 0 and seen["out"] == cli.DEFAULT_OUT
    assert cli.main(["--seed", "7", "toy", "--seed", "8", "--out", out]) == 2 and seen["seed"] == 8


def test_cifar100_problem(tmp_path, monkeypatch):
    """data='cifar100': the CIFAR-100 test set through load_cifar and a 100-class WideResNet."""
    import coup_fast.models.ncsnpp as ncsnpp
    import coup_fast.models.wideresnet as wideresnet
    from test_data import make_fake_cifar

    path, content = make_fake_cifar(str(tmp_path), dataset="cifar100", n_per_file=30, tar=True)
    seen = {}
    score, clf = neural_problem()
    monkeypatch.setattr(ncsnpp, "load_ncsnpp", lambda p, device: seen.update(score=p) or score)
    monkeypatch.setattr(wideresnet, "load_wideresnet",
                        lambda p, depth, widen, device, num_classes: seen.update(clf=p, num_classes=num_classes) or clf)
    _, _, x, y = sweep.load_problem("cifar100", n_images=8, seed=0, cifar_dir=path, score_ckpt="s.pth",
                                    classifier_ckpt="c.pt")
    want = np.random.RandomState(0).choice(30, 8, replace=False)  # the paper's subset by default
    assert seen == {"score": "s.pth", "clf": "c.pt", "num_classes": 100} and x.shape == (8, 3, 32, 32)
    assert y.tolist() == [content["test"][1][i] for i in want]
    _, _, _, y = sweep.load_problem("cifar100", n_images=8, seed=0, cifar_dir=path, score_ckpt="s.pth",
                                    classifier_ckpt="c.pt", subset="seeded")
    assert y.tolist() == [content["test"][1][i] for i in torch.randperm(30, generator=torch.Generator().manual_seed(0))[:8]]
    assert sweep.SweepConfig.preset("cifar100").eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="^subset"):
        sweep.load_problem("digits", n_images=4, subset="paper")


# --- the DDPM variant (issue 20): coup-lm swept against M and lam


def test_lm_sweep_runs_m_and_lam_axes(tmp_path, monkeypatch):
    from coup_fast.lm import index_eps_model

    score, clf, x, y = tiny_problem()
    cfg = sweep.SweepConfig(data="digits", n_images=6, eps=0.1, n_iter=2, batch_size=6, defense="coup-lm",
                            m_grid=(1, 2), lam_grid=(0.0, 1.0), lm_steps=2, lam=1.0, n_eval=2)
    real, calls = sweep.accuracy_point, []
    monkeypatch.setattr(sweep, "accuracy_point", lambda *a, **k: calls.append((k["lm_steps"], k["lam"])) or real(*a, **k))
    r = sweep.run_sweep(cfg, str(tmp_path), problem=(index_eps_model(score), clf, x, y), progress=False)
    assert [(row["axis"], row["lm_steps"], row["lam"]) for row in r["rows"]] == [
        ("lm_steps", 1, 1.0), ("lm_steps", 2, 1.0), ("lam", 2, 0.0), ("lam", 2, 1.0)]
    assert sorted(calls) == [(1, 1.0), (2, 0.0), (2, 1.0)]  # (M = 2, lam = 1) lies on both axes: run once
    for row in r["rows"]:
        assert 0.0 <= row["robust_acc"] <= row["clean_acc"] + 0.5 and row["n"] == 6 and "t_star" not in row
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "sweep.json").read_text())["config"]["defense"] == "coup-lm"


def test_lm_accuracy_point_purifies_by_likelihood_maximization(monkeypatch):
    seen = {}

    class Recording(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()
            seen.update(k)

        def forward(self, u):
            return torch.nn.functional.one_hot(torch.zeros(u.shape[0], dtype=torch.long), 2).float()

    monkeypatch.setattr(sweep, "PurifiedClassifier", Recording)
    monkeypatch.setattr(sweep.attacks, "run_attack", lambda name, model, x, y, **k: {"adv": x})
    x, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    row = sweep.accuracy_point(None, None, x, y, t_star=0.1, lam=2.0, dt=0.1, eps=0.1, n_iter=1, batch_size=2,
                               defense="coup-lm", lm_steps=7)
    assert seen["mode"] == "likelihood-max" and seen["lam"] == 2.0 and seen["lm"].n_steps == 7
    assert row["lm_steps"] == 7 and row["clean_acc"] == 1.0


def test_lm_sweep_cli_and_its_checkpoint(tmp_path, monkeypatch, capsys):
    import argparse

    import coup_fast.models.ddpm as ddpm
    import coup_fast.models.wideresnet as wideresnet
    from test_data import make_fake_cifar

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["paper", "sweep", "--defense", "coup-lm", "--m-grid", "1,5", "--lm-steps", "3"])
    assert (a.defense, a.m_grid, a.lm_steps) == ("coup-lm", (1, 5), 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["paper", "sweep", "--m-grid", "0"])
    assert cli.main(["sweep", "--defense", "coup-lm", "--ddpm-ckpt", "d.ckpt", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert "--ddpm-ckpt: applies to --data cifar10" in capsys.readouterr().err
    path, _ = make_fake_cifar(str(tmp_path), dataset="cifar100", n_per_file=30, tar=True)
    score, clf = neural_problem()
    seen = {}
    eps_net = neural_problem()[0]
    monkeypatch.setattr(ddpm, "load_ddpm", lambda p, device: seen.update(ddpm=p) or eps_net)
    monkeypatch.setattr(wideresnet, "load_wideresnet", lambda p, depth, widen, device, num_classes: clf)
    net, _, x, _ = sweep.load_problem("cifar100", n_images=4, cifar_dir=path, classifier_ckpt="c.pt",
                                      defense="coup-lm", ddpm_ckpt="d.ckpt")
    assert net is eps_net and seen == {"ddpm": "d.ckpt"} and x.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="--ddpm-ckpt"):
        sweep.load_problem("cifar100", n_images=4, cifar_dir=path, classifier_ckpt="c.pt", defense="coup-lm")

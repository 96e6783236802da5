"""coup_fast.paper.sweep: accuracy against t* and lam (Sec. 5.4, Fig. 4), on tiny networks."""
from __future__ import annotations

import json

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


def test_accuracy_point_averages_n_eval_purifications_with_an_se_over_images(monkeypatch):
    # a stand-in purified classifier: image i is right on draws where (draw + i) is even
    class Alternating(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()
            self.draw = 0

        def forward(self, u):
            right = (torch.arange(u.shape[0]) + self.draw) % 2 == 0
            self.draw += 1
            return torch.nn.functional.one_hot(torch.where(right, 0, 1), 2).float()

    seen = {}
    monkeypatch.setattr(sweep, "PurifiedClassifier", Alternating)
    monkeypatch.setattr(sweep, "apgd_ce", lambda model, x, y, **k: seen.update(k) or x)
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    # per image: all 1/2; or 2/3, 1/3, 2/3, 1/3 (deviations 1/6: sample std (1/6) sqrt(4/3), SE that / sqrt(4))
    for n_eval, acc, se in ((2, 0.5, 0.0), (3, 0.5, (1 / 6) * (4 / 3) ** 0.5 / 2)):
        row = sweep.accuracy_point(None, None, x, y, t_star=0.1, lam=1.0, dt=0.1, eps=0.1, n_iter=1, batch_size=4,
                                   n_eval=n_eval, eot=7)
        assert row["clean_acc"] == pytest.approx(acc) and row["clean_se"] == pytest.approx(se)
        assert row["n_eval"] == n_eval and seen["eot"] == 7

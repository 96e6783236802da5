"""coup_fast.paper.trajectory: confidence along the purification path (Sec. 5.3.1, Fig. 2a)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coup_fast.paper import trajectory
from coup_fast.purify import purify
from problems import neural_problem




def test_confidence_path_matches_noiseless_purify():
    score, clf = neural_problem()
    u = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    for lam in (0.0, 2.0):
        p = trajectory.confidence_path(u, torch.stack([y, y.flip(0)]), score, clf, t_star=0.05, dt=0.01, lam=lam)
        assert p.shape == (2, 3, 6)
        with torch.no_grad():
            p0 = torch.softmax(clf(u), 1)
            out = purify(u, score, clf, t_star=0.05, dt=0.01, lam=lam, mode="coup", noise=torch.zeros(5, *u.shape))
            p5 = torch.softmax(clf(out), 1)
        np.testing.assert_allclose(p[0, :, 0], p0.gather(1, y[:, None])[:, 0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(p[0, :, -1], p5.gather(1, y[:, None])[:, 0].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p[1, :, -1], p5.gather(1, y.flip(0)[:, None])[:, 0].numpy(), rtol=1e-4, atol=1e-6)


def test_noiseless_victim_is_deterministic_and_differentiable():
    score, clf = neural_problem()
    victim = trajectory.NoiselessPurified(score, clf, t_star=0.03, dt=0.01)
    u = torch.rand(2, 1, 4, 4, requires_grad=True)
    a, b = victim(u), victim(u)
    torch.testing.assert_close(a, b)
    (g,) = torch.autograd.grad(a.sum(), u)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_run_trajectory_outputs(tmp_path):
    score, clf = neural_problem()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    victim = trajectory.NoiselessPurified(score, clf, t_star=0.03, dt=0.01)
    with torch.no_grad():
        y = victim(x).argmax(1)  # all clean-correct, so every successful attack is a failure
    s = trajectory.run_trajectory(str(tmp_path), problem=(score, clf, x, y), eps=0.5, t_star=0.03, dt=0.01,
                                  lam=1.0, n_iter=5, progress=False)
    arr = np.load(tmp_path / "trajectory.npz")
    n = s["n_failures"]
    assert n > 0
    for key in ("p_true_noguide", "p_adv_noguide", "p_true_guided", "p_adv_guided"):
        assert arr[key].shape == (n, 4) and np.all((arr[key] >= 0) & (arr[key] <= 1))
    assert np.all(arr["y_adv"] != arr["y_true"]) and arr["t"][0] == pytest.approx(0.03) and arr["t"][-1] == 0
    # w/o guidance the path ends on the adversarial label (that is what a failure is)
    assert np.all(arr["p_adv_noguide"][:, -1] >= arr["p_true_noguide"][:, -1])
    assert (tmp_path / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "trajectory.json").exists()
    # w/o guidance every failure ends on y_adv (that is what a failure is); with guidance, a path
    # whose final p(y_true) is above 1/2 must be predicted y_true
    assert s["final_acc_noguide"] == 0.0 and np.all(arr["final_pred_noguide"] == arr["y_adv"])
    guided_top = arr["p_true_guided"][:, -1] > 0.5
    assert np.all(arr["final_pred_guided"][guided_top] == arr["y_true"][guided_top])
    assert s["final_acc_guided"] == pytest.approx(float(np.mean(arr["final_pred_guided"] == arr["y_true"])))


def test_unwritable_out_fails_before_any_compute(tmp_path, monkeypatch, capsys):
    from coup_fast.paper.cli import main as paper_main

    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(trajectory, "apgd_ce", lambda *a, **k: pytest.fail("attacked before out_dir was checked"))
    monkeypatch.setattr(trajectory, "load_problem", lambda *a, **k: pytest.fail("loaded before out_dir was checked"))
    score, clf = neural_problem()
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="^out_dir .*file.txt/sub.*cannot create"):
        trajectory.run_trajectory(str(tmp_path / "file.txt" / "sub"), problem=(score, clf, x, torch.zeros(2).long()),
                                  t_star=0.03, dt=0.01, progress=False)
    assert paper_main(["trajectory", "--out", str(tmp_path / "file.txt" / "sub"), "--no-progress"]) == 2
    assert "error: --out" in capsys.readouterr().err


def test_outputs_are_written_whole(tmp_path):
    """npz, json, png through temporary names and a rename: no temporary file left, the npz not renamed."""
    score, clf = neural_problem()
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    trajectory.run_trajectory(str(tmp_path), problem=(score, clf, x, torch.zeros(4).long()), eps=0.5, t_star=0.03,
                              dt=0.01, n_iter=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.json", "trajectory.npz", "trajectory.png"]
    assert set(np.load(tmp_path / "trajectory.npz")) >= {"t", "p_true_guided", "index"}

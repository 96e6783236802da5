"""benchmarks/bench_attacks.py: the --quick run (what CI runs, so the benchmark does not rot) and its pieces.

No timed assertions: the numbers are checked for being there and finite, and for the invariants that hold
whatever the machine (the baseline loop differentiates the same computation, the memory modes agree
bitwise, the attacks count the gradients they ask for).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_attacks  # noqa: E402


def test_quick_run_writes_every_workload(tmp_path):
    out = tmp_path / "quick.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_attacks", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch threads 1" in proc.stdout and "(a) one exact input gradient" in proc.stdout
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["config"]["quick"]
    rows = report["rows"]
    grads = {(r["method"], r["batch"]): r for r in rows if r["workload"] == "a"}
    assert set(grads) == {(m, b) for m in bench_attacks.QUICK_METHODS for b in (1, 4)}
    for r in grads.values():
        assert r["seconds"] > 0 and math.isfinite(r["img_grad_per_s"]) and r["peak_mib"] is not None
    for b in (1, 4):
        assert grads["lean", b]["max_rel_defaults"] == 0.0  # memory budgets give lean's gradient bitwise
        assert grads["unrolled", b]["cos_defaults"] > 0.99999  # the same computation on the same noise
        assert grads["unrolled", b]["x_unrolled"] == 1.0
    attacks = [r for r in rows if r["workload"] == "b"]
    assert {(r["method"], r["attack"], r["eot"]) for r in attacks} >= {
        ("unrolled", "pgd-eot", "sequential"), ("unrolled", "pgd-eot", "batched"), ("diffpure", "pgd-eot", "sequential"),
        ("defaults", "pgd-eot", "sequential"), ("defaults", "pgd-eot", "batched"),
        ("defaults", "pgd-eot", "attacks.pgd_eot"), ("defaults", "apgd-ce", "-"), ("unrolled", "apgd-ce", "-")}
    for r in attacks:
        assert r["seconds"] > 0 and 0 <= r["robust_acc"] <= 1
        if r["attack"] == "pgd-eot":
            assert r["image_gradients"] == 2 * 2 * 4  # iterations x EOT x images
        else:
            assert 0 < r["image_gradients"] <= 3 * 4  # (iterations + 1) x the images APGD attacks
    floor = [r for r in rows if r["workload"] == "floor"]
    assert {r["layout"] for r in floor} == {"fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"}
    assert all(0 < r["conv_ms"] < r["networks_ms"] for r in floor)


def test_unrolled_baseline_is_purifys_computation():
    """The baseline loop written in the benchmark differentiates what coup_fast runs: same noise, the same
    output to round-off, and the exact gradient to round-off."""
    from coup_fast import PurifiedClassifier
    from coup_fast.noise import draw_seed, philox_normal
    from problems import neural_problem

    score, clf = neural_problem(torch.float64)
    x = 0.2 + 0.6 * torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = bench_attacks.Unrolled(score, clf, t_star=0.02, dt=0.004)
    seed = draw_seed(torch.Generator().manual_seed(9))
    noise = torch.stack([philox_normal(seed, k, x.shape, dtype=torch.float64) for k in range(base.n_steps)])
    model = PurifiedClassifier(score, clf, t_star=0.02, dt=0.004, generator=torch.Generator().manual_seed(9))
    got, want = [], []
    for fn, into in ((lambda v: base(v, noise), got), (model, want)):
        xr = x.clone().requires_grad_(True)
        logits = fn(xr)
        into += [logits.detach(), torch.autograd.grad(logits.square().sum(), xr)[0]]
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert ((got[1] - want[1]).norm() / want[1].norm()).item() < 1e-9


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        bench_attacks.parse_args(["--methods", "magic"])
    with pytest.raises(SystemExit):
        bench_attacks.parse_args(["--workloads", "c"])
    args = bench_attacks.parse_args(["--quick"])
    assert args.batch == [1, 4] and args.t_star == 0.005 and args.methods == list(bench_attacks.QUICK_METHODS)
    full = bench_attacks.parse_args([])
    assert full.batch == [1, 32, 256] and full.workloads == ["a", "b", "floor"] and full.threads == 1
    assert (full.pgd_iter, full.eot, full.apgd_iter, full.n_images) == (20, 10, 20, 32)
    cifar = bench_attacks.parse_args(["--arch", "cifar"])
    assert cifar.batch == [64] and cifar.workloads == ["a"] and "diffpure" in cifar.methods

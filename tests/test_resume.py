"""A run killed with SIGKILL mid-way and restarted with the same command skips finished records and
ends with the same tables and per-image verdicts as an uninterrupted run."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import torch

WEIGHTS = os.path.join(os.path.dirname(__file__), os.pardir, "coup_fast", "weights")
# Tiny but complete: a deterministic and a stochastic defense, clean + APGD-CE, 4 batches per cell, and the
# gradient-masking checks (the unbounded attack on both, the gradient consistency of the stochastic one).
TINY = ["--n-images", "8", "--batch-size", "2", "--defenses", "none,reverse", "--attacks", "apgd-ce", "--dt", "0.05",
        "--n-iter", "2", "--n-eval", "2", "--seed", "3", "--diag-images", "2", "--diag-draws", "2", "--pgd-eot", "2",
        "--no-progress"]
N_RECORDS = 16 + 3  # (2 defenses x (clean + apgd-ce) x 4 batches) + 2 unbounded attacks + 1 consistency check


def weights_dir(tmp_path_factory):
    """The shipped digits weights, or random stand-ins of the same architecture until they exist."""
    if os.path.isfile(os.path.join(WEIGHTS, "digits_score.safetensors")):
        return os.path.abspath(WEIGHTS)
    from safetensors.torch import save_file

    from coup_fast.models.digits import DigitsClassifier, DigitsEpsNet

    d = tmp_path_factory.mktemp("standin_weights")
    torch.manual_seed(0)
    save_file(DigitsEpsNet().state_dict(), str(d / "digits_score.safetensors"))
    save_file(DigitsClassifier().state_dict(), str(d / "digits_classifier.safetensors"))
    return str(d)


def command(out, weights):
    return [sys.executable, "-m", "coup_fast.cli", "eval", *TINY, "--weights-dir", weights, "--out", str(out)]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["rows"]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tmp_path_factory):
    weights = weights_dir(tmp_path_factory)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(command(ref, weights), env=env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(command(killed, weights), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = str(killed / "batches" / "*" / "**" / "batch*.json")
    records = str(killed / "batches" / "*" / "*" / "*" / "**" / "*.json")
    deadline = time.time() + 120
    while not glob.glob(pattern, recursive=True) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed"
    done = {p: os.stat(p).st_mtime_ns for p in glob.glob(records, recursive=True)}
    assert done and len(done) < N_RECORDS and not (killed / "results.json").exists()

    subprocess.run(command(killed, weights), env=env(), check=True, capture_output=True, timeout=300)
    assert all(os.stat(p).st_mtime_ns == t for p, t in done.items()), "finished records were recomputed"
    assert len(glob.glob(pattern, recursive=True)) == 16 and len(glob.glob(records, recursive=True)) == N_RECORDS
    assert rows(killed) == rows(ref)
    for name in ("results.md", "samples.csv"):  # the tables, and the per-image verdicts behind the worst case
        with open(killed / name) as f, open(ref / name) as g:
            assert f.read() == g.read()
    with open(killed / "results.json") as f, open(ref / "results.json") as g:
        assert json.load(f)["diagnostics"] == json.load(g)["diagnostics"]

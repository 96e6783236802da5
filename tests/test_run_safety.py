"""Issue 26, the evaluation's side: records that block resume, edited records, two runs on one --out, NaN weights
without a purifier, unguarded sizes, wrong types and silently ignored settings, and what --help says."""
import errno
import glob
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from coup_fast import purify
from coup_fast.attacks import AttackSettings
from coup_fast.cli import ConfigError, EvalConfig, build_parser, main as cli_main, validate
from coup_fast.evaluate import evaluate
from coup_fast.models import load_digits_models
from coup_fast.records import RunLock
from problems import neural_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_EVAL = ["eval", "--n-images", "4", "--batch-size", "4", "--defenses", "none,reverse", "--attacks", "pgd-eot",
             "--dt", "0.05", "--pgd-iter", "1", "--pgd-eot", "2", "--n-eval", "2", "--diag-images", "2", "--device",
             "cpu", "--no-progress"]


def _no_work(*a, **k):
    raise AssertionError("loaded models or data before the settings were checked")


def _tiny_eval(out_dir, **kw):
    score, clf = neural_problem()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = clf(x).argmax(1)
    from coup_fast import PurifiedClassifier

    models = {"none": clf, "rev": PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse")}
    return evaluate(models, x, y, attacks=["pgd-eot"], eps={"Linf": 0.2}, n_eval=3, batch_size=4, out_dir=str(out_dir),
                    progress=False, settings=AttackSettings(pgd_iter=2, pgd_eot=2), diag_images=2, **kw)


def _record_path(out_dir):
    (path,) = glob.glob(str(out_dir / "batches" / "*" / "Linf" / "rev-*" / "pgd-eot" / "batch00000.json"))
    return path


# ------------------------------------------------------------------------------- 6. records that block resume
@pytest.mark.parametrize("damage", ["no seconds", "string seconds", "deep array", "dev zero", "edited verdicts"])
def test_a_record_that_would_block_resume_is_set_aside_and_recomputed(tmp_path, capsys, damage):
    """Each of these made every rerun fail (KeyError, TypeError, RecursionError) or hang (/dev/zero), or, for an edit
    claiming higher accuracy, was accepted as it was."""
    want = _tiny_eval(tmp_path).cells
    path = _record_path(tmp_path)
    record = json.loads(open(path).read())
    if damage == "no seconds":
        record.pop("seconds")
    elif damage == "string seconds":
        record["seconds"] = "fast"
    elif damage == "edited verdicts":  # every evaluation correct: a forged robust accuracy
        record["correct"] = [[[1] * len(run) for run in cand] for cand in record["correct"]]
    if damage == "deep array":
        text = "[" * 200_000 + "]" * 200_000
    else:
        text = json.dumps(record)
    os.remove(path)
    if damage == "dev zero":
        os.symlink("/dev/zero", path)
    else:
        open(path, "w").write(text)
    again = _tiny_eval(tmp_path)
    err = capsys.readouterr().err
    assert f"{path}: unreadable or inconsistent result record" in err and f"moved to {path}.unreadable" in err
    assert again.cells == want  # recomputed from the same seeds
    assert os.path.lexists(f"{path}.unreadable")  # kept, never deleted


def test_a_record_copied_from_another_run_folder_is_not_trusted(tmp_path, capsys):
    """Records are signed with their run's key: the same file under another run's folder fails the check."""
    _tiny_eval(tmp_path / "a")
    _tiny_eval(tmp_path / "b")
    src, dst = _record_path(tmp_path / "a"), _record_path(tmp_path / "b")
    rec = json.loads(open(src).read())
    rec["correct"] = [[[1] * len(run) for run in cand] for cand in rec["correct"]]
    open(dst, "w").write(json.dumps(rec))  # edited, keeping run a's signature
    _tiny_eval(tmp_path / "b")
    assert "its signature does not match its content" in capsys.readouterr().err


# ------------------------------------------------------------------------------- 8. two runs on one --out
def test_a_second_run_on_the_same_out_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from coup_fast.records import RunLock
        with RunLock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"another run is using this folder \\(PID {holder.pid}"):
            _tiny_eval(tmp_path)
        assert not (tmp_path / "results.json").exists()
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
        _tiny_eval(tmp_path)
        assert (tmp_path / "results.json").exists()
    finally:
        holder.kill()


def test_the_cli_names_out_when_another_run_holds_it(tmp_path, capsys):
    with RunLock(str(tmp_path / "o")):
        assert cli_main([*TINY_EVAL, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: --out: '{tmp_path / 'o'}': another run is using this folder (PID {os.getpid()}" in err


def test_the_lock_does_not_let_a_starting_run_delete_the_other_runs_temporary_files(tmp_path):
    out = tmp_path / "o"
    (out / "batches").mkdir(parents=True)
    in_flight = out / "batches" / "batch00000.json.tmp4242"
    in_flight.write_text("being written")
    with RunLock(str(out)):
        with pytest.raises(ValueError, match="another run"):
            _tiny_eval(out)
    assert in_flight.read_text() == "being written"


# ------------------------------------------------------------------------------- 7. NaN weights, no purifier
def test_nan_classifier_weights_are_refused_for_every_defense_including_none(tmp_path, capsys):
    """A NaN weight gave NaN logits, read as class 0 by argmax: eval reported a plausible accuracy, and --dry-run
    called the file loaded strictly."""
    from safetensors.torch import save_file

    _, clf = load_digits_models()
    state = {k: v.clone() for k, v in clf.state_dict().items()}
    key = next(k for k, v in state.items() if k.endswith("weight") and v.is_floating_point())
    state[key].view(-1)[0] = math.nan
    weights = tmp_path / "w"
    weights.mkdir()
    save_file(state, str(weights / "digits_classifier.safetensors"))
    for name in ("digits_score.safetensors", "digits.json"):  # the shipped score model, untouched
        with open(os.path.join(ROOT, "coup_fast", "weights", name), "rb") as src:
            (weights / name).write_bytes(src.read())
    argv = [*TINY_EVAL, "--defenses", "none", "--weights-dir", str(weights), "--out", str(tmp_path / "o")]
    for extra in ([], ["--dry-run"]):
        assert cli_main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert "error: --weights-dir:" in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_negative_batch_norm_variance_or_nan_logits_are_refused_before_any_work():
    from coup_fast.cli import check_networks

    cfg = validate(EvalConfig(data="digits"))
    x = torch.rand(2, 1, 8, 8)
    clf = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 36, 10)).eval()
    check_networks(cfg, None, None, clf, x)  # sound: no error
    with torch.no_grad():
        clf[1].running_var[2] = -0.5
    with pytest.raises(ConfigError, match=r"^--weights-dir: the classifier's weights are not usable: 1.running_var"):
        check_networks(cfg, None, None, clf, x)
    class ZeroOverZero(torch.nn.Module):  # finite (no) weights, NaN logits
        def forward(self, u):
            return torch.zeros(u.shape[0], 10) / 0.0

    with pytest.raises(ConfigError, match="gives NaN or Inf for a test image .argmax would read"):
        check_networks(cfg, None, None, ZeroOverZero(), x)


# ------------------------------------------------------------------------------- 5. unguarded sizes
@pytest.mark.parametrize("argv,field", [
    (["--lm-steps", "1000000000"], "lm_steps"),
    (["--wrn-depth", "1000000"], "wrn_depth"),
    (["--wrn-depth", "27"], "wrn_depth"),
    (["--threads", "100000000000000000000"], "threads"),
    (["--seed", "100000000000000000000"], "seed"),
    (["--seed", "-1"], "seed"),
    (["--eps-linf", "50"], "eps_linf"),
    (["--eps-l2", "9"], "eps_l2"),  # the digits box's diagonal is 8
    (["--threats", "Linf,Linf"], "threats"),
    (["--attacks", "pgd-eot,apgd-ce,pgd-eot"], "attacks"),
    (["--defenses", "diffpure", "--t-star", "0.1005"], "t_star"),  # DiffPure's discrete schedule: 1/1000 grid
    (["--pilot", "100"], "pilot"),  # more than --n-images
    (["--schedule", "sometimes"], "schedule"),
])
def test_sizes_types_and_contradictions_are_config_errors_before_any_work(tmp_path, monkeypatch, capsys, argv, field):
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    assert cli_main([*TINY_EVAL, *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: --{field.replace('_', '-')}:" in err and "Traceback" not in err, err


def test_a_cifar_seed_out_of_range_is_named_before_any_checkpoint_loads(tmp_path, monkeypatch, capsys):
    for name in ("cifar", "s.pth", "c.pt"):
        (tmp_path / name).write_text("")
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    argv = ["eval", "--data", "cifar10", "--cifar-dir", str(tmp_path / "cifar"), "--score-ckpt", str(tmp_path / "s.pth"),
            "--classifier-ckpt", str(tmp_path / "c.pt"), "--seed", "-1", "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    assert "error: --seed:" in capsys.readouterr().err


def test_lm_defenses_take_any_dt_they_do_not_use(tmp_path, monkeypatch):
    cfg = validate(EvalConfig(defenses=["none", "lm"], dt=0.5))
    assert cfg.dt == 0.5
    with pytest.raises(ConfigError, match="^--dt:"):
        validate(EvalConfig(defenses=["none", "reverse"], dt=0.5))
    score, clf = load_digits_models()
    x = torch.rand(2, 1, 8, 8)
    out = purify(x, score, clf, mode="likelihood-max", dt=0.5, t_star=0.1, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_purify_refuses_sizes_that_cannot_fit_naming_the_argument():
    score, clf = load_digits_models()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="^samples: 1,000,000,000 samples"):
        purify(x, score, clf, samples=10**9)
    with pytest.raises(ValueError, match="^dt: N = .* steps need at least"):
        purify(x, score, clf, dt=1e-25, max_steps=10**30)
    with pytest.raises(ValueError, match="^x: images of shape .* have no pixels"):
        purify(torch.rand(4, 1, 0, 8), score, clf)


def test_a_batched_call_that_runs_out_of_memory_says_to_set_eot_chunk(tmp_path):
    """--n-eval 200000 (R evaluations in one batched call) under a 2 GiB address-space cap: a clear message naming
    --eot-chunk, not an allocator traceback."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from coup_fast.cli import main
        sys.exit(main({[*TINY_EVAL, "--defenses", "reverse", "--attacks", "pgd-eot", "--n-eval", "200000",
                         "--no-diagnostics", "--out", str(tmp_path / "o")]!r}))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --eot-chunk: a batched purification ran out of memory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_full_disk_during_the_run_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import coup_fast.records as records

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(records, "atomic_write_text", full)
    assert cli_main([*TINY_EVAL, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --out:" in err and "disk is full" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- 12. silently ignored
def test_top_level_settings_beside_an_eval_table_are_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "run.toml").write_text("n_images = 3\n[eval]\nseed = 1\n")
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    assert cli_main(["eval", "--config", str(tmp_path / "run.toml"), "--device", "cpu"]) == 2
    assert "error: --config:" in capsys.readouterr().err


def test_the_dry_run_measures_a_few_lm_steps_not_whole_purifications(tmp_path, capsys, monkeypatch):
    """--lm-steps 500 --dry-run ran 500-step purifications (77 s); it now times a few steps and scales them."""
    import coup_fast.engines.eager as eager

    steps, real = [], eager.lm_solve

    def counting(x, eps_model, classifier, config, **kw):
        steps.append(config.n_steps)
        return real(x, eps_model, classifier, config, **kw)

    monkeypatch.setattr(eager, "lm_solve", counting)
    argv = [*TINY_EVAL, "--defenses", "none,lm", "--lm-steps", "500", "--dry-run", "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 0
    assert steps and max(steps) <= 2, steps
    assert "| lm | Linf |" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 16. --help
def test_every_eval_flag_shows_its_default_and_the_off_switches_read_right():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert "default" in (action.help or "") or action.dest in ("progress", "diagnostics"), action.option_strings
    helps = {a.dest: a.help for a in sub._actions}
    assert helps["n_iter"].endswith("(default on digits: 5; CIFAR: 100)")
    assert helps["out"].endswith("(default: coup_fast_eval)")
    assert helps["diagnostics"].startswith("skip the gradient-masking checks")
    assert helps["progress"].startswith("no progress bars")


@pytest.mark.parametrize("damage", ["deep array", "dev zero", "string value", "not an object"])
def test_a_paper_cell_that_would_block_resume_is_set_aside_and_recomputed(tmp_path, capsys, damage):
    """`paper toy` / `paper sweep` cells: the same bounded reading (a 200k-deep array raised RecursionError and a link
    to /dev/zero read forever on every rerun) and a check of the value the study reads."""
    from coup_fast.paper import CellStore

    store = CellStore(str(tmp_path), {"study": "t"})
    store.put("a", {"robust_acc": 0.5, "n": 8})
    path = store._path("a")
    os.remove(path)
    key = json.dumps(store.key)
    if damage == "deep array":
        open(path, "w").write("[" * 200_000 + "]" * 200_000)
    elif damage == "dev zero":
        os.symlink("/dev/zero", path)
    elif damage == "string value":
        open(path, "w").write('{"key": %s, "name": "a", "value": {"robust_acc": "high"}}' % key)
    else:
        open(path, "w").write('{"key": %s, "name": "a", "value": [1, 2]}' % key)
    assert CellStore(str(tmp_path), {"study": "t"}).get("a") is None  # recomputed by the study
    assert "unreadable cell" in capsys.readouterr().err and os.path.lexists(path + ".unreadable")


@pytest.mark.parametrize("argv,flag", [
    (["paper", "sweep", "--device", "meta"], "--device"),
    (["paper", "toy", "--n-paths", "1000000000000"], "--n-paths"),
    (["paper", "sweep", "--defense", "coup", "--m-grid", "1,2"], "--m-grid"),
    (["paper", "sweep", "--defense", "coup-lm", "--t-grid", "0.05,0.1"], "--t-grid"),
])
def test_paper_commands_refuse_what_they_would_crash_on_or_ignore(tmp_path, capsys, argv, flag):
    """A meta device and 1e12 toy paths ended in tracebacks; --m-grid was silently ignored with --defense coup."""
    import contextlib

    parse_error = flag in ("--device", "--n-paths")  # refused by argparse itself (exit status 2)
    with pytest.raises(SystemExit, match="2") if parse_error else contextlib.nullcontext():
        assert cli_main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and not (tmp_path / "o" / "sweep.json").exists()

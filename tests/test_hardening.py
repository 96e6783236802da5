"""Bad input is a clear error naming the argument, and non-finite results never pass silently (issue 17)."""
import pytest
import torch

from coup_fast import PurifiedClassifier, purify
from problems import neural_problem


@pytest.fixture
def nets():
    return neural_problem()


def _x(b=3):
    return torch.rand(b, 1, 4, 4, generator=torch.Generator().manual_seed(0))


KW = dict(t_star=0.02, dt=0.005)


class _NaNBelow(torch.nn.Module):
    """A score model that returns NaN once t drops below t_nan."""

    def __init__(self, score, t_nan):
        super().__init__()
        self.score, self.t_nan = score, t_nan

    def forward(self, x, t):
        out = self.score(x, t)
        return out * float("nan") if float(t[0]) < self.t_nan else out


def test_a_score_model_returning_nan_is_named_with_its_step(nets):
    score, clf = nets
    with pytest.raises(ValueError, match=r"^score_model: returned NaN or Inf at step 2 \(t = 0\.01"):
        purify(_x(), _NaNBelow(score, 0.011), clf, **KW)
    out = purify(_x(), _NaNBelow(score, 0.011), clf, check_finite=False, **KW)  # the flag turns the check off
    assert torch.isnan(out).any()


def test_a_classifier_returning_nan_logits_is_named(nets):
    score, clf = nets
    with pytest.raises(ValueError, match="^classifier: its confidence gradient is NaN"):
        purify(_x(), score, lambda u: clf(u) * float("nan"), **KW)


def test_overflowing_noise_is_reported(nets):
    # finite draws so large that the state overflows float32 within a few steps
    _, clf = nets
    growing = lambda x, t: 1e3 * x  # noqa: E731  (finite for finite x)
    noise = torch.full((4, 3, 1, 4, 4), 1e36)
    with pytest.raises(ValueError, match=r"^(noise: the state overflowed|score_model: .*states up to \|x\| = [0-9.]+e\+3)"):
        purify(_x(), growing, clf, noise=noise, **KW)


def test_a_non_finite_gradient_is_reported(nets):
    score, clf = nets

    class NaNDerivative(torch.nn.Module):  # finite values, NaN derivative: d/dx sqrt(x - x) at 0
        def forward(self, x, t):
            return score(x, t) + torch.sqrt((x - x.detach()).abs())

    x = _x().requires_grad_(True)
    out = purify(x, NaNDerivative(), clf, **KW)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="^gradient: the backward pass gave NaN or Inf"):
        out.sum().backward()


@pytest.mark.parametrize("case,name", [
    (dict(x=torch.rand(2, 1, 4, 4, device="meta")), "x"),
    (dict(x=_x().double()), "x"),  # float64 images, float32 networks
    (dict(score=lambda x, t: (torch.zeros_like(x),)), "score_model"),  # a tuple
    (dict(score=lambda x, t: None), "score_model"),
    (dict(clf=lambda u: None), "classifier"),
    (dict(clf="detached"), "classifier"),
    (dict(noise=torch.zeros(4, 3, 1, 4, 4), generator=torch.Generator()), "generator"),  # noise wins: say so
    (dict(noise=torch.zeros(4, 3, 1, 4, 4, requires_grad=True)), "noise"),  # no gradient would reach it
    (dict(dt=1e-7, t_star=0.1), "dt"),  # 10^6 steps
    (dict(samples=0), "samples"),
    (dict(check_finite="yes"), "check_finite"),
])
def test_bad_arguments_name_themselves(nets, case, name):
    score, clf = nets
    x = case.pop("x", _x())
    score = case.pop("score", score)
    clf = case.pop("clf", clf)
    if clf == "detached":
        base = neural_problem()[1]
        clf = lambda u: base(u).detach()  # noqa: E731
    kw = {**KW, **case}
    with pytest.raises(ValueError, match=rf"^{name}:"):
        purify(x, score, clf, **kw)


def test_many_steps_need_the_limit_raised(nets):
    score, clf = nets
    with pytest.raises(ValueError, match=r"^dt:.*N = 200 steps.*max_steps"):
        purify(_x(), score, clf, t_star=0.2, dt=1e-3, max_steps=100)
    assert purify(_x(), score, clf, t_star=0.2, dt=1e-3, max_steps=200).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(t_star=5), "t_star"), (dict(mode="x"), "mode"), (dict(foo=1), "foo"), (dict(lam=True), "lam"),
    (dict(gradient="nope"), "gradient"), (dict(engine="jit"), "engine"), (dict(memory="huge"), "memory"),
    (dict(noise=torch.zeros(4, 3, 1, 4, 4)), "noise"), (dict(generator=3), "generator"),
])
def test_purified_classifier_validates_everything_when_it_is_built(nets, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        PurifiedClassifier(*nets, **kwargs)


def test_batched_samples_are_the_sequential_calls(nets):
    # samples=K draws K seeds in order, sample r exactly as the r-th of K calls; gradients to round-off
    score, clf = nets
    x = _x(2)
    w = torch.randn(3 * 2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for mode in ("coup", "diffpure"):
        gen = torch.Generator().manual_seed(5)
        xs = x.clone().requires_grad_(True)
        seq = [purify(xs, score, clf, mode=mode, generator=gen, **KW) for _ in range(3)]
        gen = torch.Generator().manual_seed(5)
        xb = x.clone().requires_grad_(True)
        batched = purify(xb, score, clf, mode=mode, generator=gen, samples=3, **KW)
        torch.testing.assert_close(batched, torch.cat(seq), rtol=1e-5, atol=1e-6)
        (g_seq,) = torch.autograd.grad((torch.cat(seq) * w).sum(), xs)
        (g_batched,) = torch.autograd.grad((batched * w).sum(), xb)
        torch.testing.assert_close(g_batched, g_seq, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- coup-fast eval (issue 17, items 2, 5, 9)
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from coup_fast.attacks import AttackSettings  # noqa: E402
from coup_fast.cli import ConfigError, main as cli_main  # noqa: E402
from coup_fast.evaluate import evaluate  # noqa: E402


def _tiny_eval(out_dir):
    score, clf = neural_problem()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = clf(x).argmax(1)
    models = {"none": clf, "rev": PurifiedClassifier(score, clf, t_star=0.1, dt=0.05, mode="reverse")}
    return evaluate(models, x, y, attacks=["pgd-eot"], eps={"Linf": 0.2}, n_eval=3, batch_size=4, out_dir=str(out_dir),
                    progress=False, settings=AttackSettings(pgd_iter=2, pgd_eot=2), diag_images=2)


def _stale(record):
    """Another batch's record under this name: its own index and different verdicts."""
    record["index"] = [record["index"][0] + 4, record["index"][1] + 4]
    record["correct"] = [[[1 - v for v in run] for run in cand] for cand in record["correct"]]
    return json.dumps(record)


CORRUPTIONS = {
    "truncated": lambda text, record: text[: len(text) // 2],
    "not json": lambda text, record: "\x00\xff garbage",
    "a list": lambda text, record: "[1, 2, 3]",
    "stale index": lambda text, record: _stale(record),
    "narrower": lambda text, record: json.dumps({**record, "correct": [[run[:-1] for run in c] for c in record["correct"]]}),
    "other R": lambda text, record: json.dumps({**record, "n_eval": 7}),
    "other run": lambda text, record: json.dumps({**record, "hash": "0" * 12}),
    "not verdicts": lambda text, record: json.dumps({**record, "correct": [[[2] * len(record["correct"][0][0])]]}),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_bad_batch_record_is_reported_set_aside_and_recomputed(tmp_path, capsys, kind):
    want = _tiny_eval(tmp_path).cells
    (path,) = [p for p in glob.glob(str(tmp_path / "batches" / "*" / "Linf" / "rev-*" / "pgd-eot" / "batch00000.json"))]
    text = open(path).read()
    bad = CORRUPTIONS[kind](text, json.loads(text))
    with open(path, "w", errors="surrogateescape") as f:
        f.write(bad)
    again = _tiny_eval(tmp_path)
    err = capsys.readouterr().err
    assert f"{path}: unreadable or inconsistent result record" in err and f"moved to {path}.unreadable" in err
    with open(f"{path}.unreadable", errors="surrogateescape") as f:
        assert f.read() == bad  # kept, never deleted
    assert again.cells == want  # recomputed from the same seeds
    assert json.loads(open(path).read())["index"] == [0, 4]


def test_leftover_temporary_files_are_removed_and_nothing_else(tmp_path, capsys):
    _tiny_eval(tmp_path)
    (batch,) = glob.glob(str(tmp_path / "batches" / "*" / "Linf" / "none-*" / "pgd-eot"))
    leftovers = [os.path.join(batch, "batch00001.json.tmp4242"), str(tmp_path / "results.json.tmp77")]
    for p in leftovers:
        open(p, "w").write("half")
    (tmp_path / "notes.tmp1").write_text("mine")  # not ours: stays
    _tiny_eval(tmp_path)
    assert not any(os.path.exists(p) for p in leftovers) and (tmp_path / "notes.tmp1").read_text() == "mine"
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def _no_work(*a, **k):
    raise AssertionError("loaded models or data before the settings were checked")


TINY_EVAL = ["eval", "--n-images", "4", "--batch-size", "4", "--defenses", "none,reverse,lm", "--attacks", "pgd-eot",
             "--dt", "0.05", "--pgd-iter", "1", "--pgd-eot", "2", "--n-eval", "2", "--lm-steps", "1", "--diag-images",
             "2", "--device", "cpu"]


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_eval_out_that_is_a_file_fails_before_any_work(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / ("sub" if where == "under_a_file" else "")
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    assert cli_main([*TINY_EVAL, "--out", str(out).rstrip("/")]) == 2
    err = capsys.readouterr().err
    assert "error: --out:" in err and "file.txt" in err and "Traceback" not in err
    assert (tmp_path / "file.txt").read_text() == "x"


def test_eval_out_that_is_not_writable_fails_before_any_work(tmp_path, monkeypatch, capsys):
    """Tests run as root, for whom a 0o555 folder is writable: os.access stands in for the permission."""
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert cli_main([*TINY_EVAL, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --out:" in err and "not writable" in err and not (tmp_path / "o").exists()


def test_eval_device_meta_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    argv = [a for a in TINY_EVAL if a != "cpu" and a != "--device"]
    assert cli_main([*argv, "--device", "meta", "--out", str(tmp_path / "o")]) == 2
    assert "error: --device: 'meta'" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("line,field", [
    ('defenses = ["none", 3]', "defenses"),
    ("out = 5", "out"),
    ("lam = true", "lam"),
    ('seed = "7"', "seed"),
    ("n_images = 2.5", "n_images"),
    ('diagnostics = "yes"', "diagnostics"),
    ("eps_linf = true", "eps_linf"),
    ("attacks = [1]", "attacks"),
    ('protocol = "lee-kim,nope"', "protocol"),
])
def test_eval_config_values_of_the_wrong_type_fail_before_any_work(tmp_path, monkeypatch, capsys, line, field):
    (tmp_path / "run.toml").write_text(line + "\n")
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["eval", "--config", "run.toml", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: --{field.replace('_', '-')}:" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["run.toml"]  # nothing written


def test_eval_dt_beyond_the_step_limit_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("coup_fast.cli.load_everything", _no_work)
    assert cli_main(["eval", "--dt", "1e-7", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: --dt:" in err and "N = 1,000,000 steps" in err and "100,000" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="^--dt:"):
        from coup_fast.cli import EvalConfig, validate

        validate(EvalConfig(dt=1e-6, t_star=0.2))


def test_eval_progress_states_the_step_counts(tmp_path, capsys):
    assert cli_main([*TINY_EVAL, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "reverse: N = 2 SDE steps" in err and "lm: M = 1 LM steps" in err and "n = 4 images" in err


def test_eval_out_on_a_read_only_file_system_fails_before_any_compute(tmp_path, monkeypatch, capsys):
    """A read-only mount refuses the probe file even to root (open raises EROFS): caught after loading, before
    the evaluation computes anything."""
    import errno

    import coup_fast.paper as paper

    def read_only_fs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("coup_fast.cli.evaluate", _no_work)
    monkeypatch.setattr(paper, "open", read_only_fs, raising=False)  # shadows the builtin in that module only
    assert cli_main([*TINY_EVAL, "--out", str(tmp_path / "o")]) == 2
    assert "error: --out: " in capsys.readouterr().err

"""The embedded digits default: shipped weights, their quality, retraining, purification."""
import json
import os

import pytest
import torch

from coup_fast.data import load_digits
from coup_fast.models import load_digits_models
from coup_fast.models.digits import (CLASSIFIER_FILE, META_FILE, SCORE_FILE, WEIGHTS_DIR,
                                     DigitsClassifier, DigitsEpsNet)
from coup_fast.sde import vp_sigma
from coup_fast.train import CHECKPOINT_DIR, accuracy, eval_dsm, main, train_classifier, train_score

# Thresholds sit below the values measured on the shipped weights (coup_fast/weights/digits.json):
# clean test accuracy 0.9933; denoising loss on the test split t=0.01: 0.541, t=0.05: 0.345,
# t=0.1: 0.231, training t-mixture: 0.154 (eps_hat = 0 scores 1.0); after purification at
# t* = 0.1 with generator seed 0: 0.9767 (lam = 0) and 0.9833 (lam = 1).
MIN_CLEAN_ACC = 0.97
MAX_SCORE_LOSS = {"t=0.01": 0.65, "t=0.05": 0.42, "t=0.1": 0.29, "mix": 0.20}
MIN_PURIFIED_ACC = {0.0: 0.95, 1.0: 0.95}




@pytest.fixture(scope="module")
def models():
    return load_digits_models()


@pytest.fixture(scope="module")
def test_split():
    return load_digits("test")


def test_shipped_files_are_small_and_described():
    for f in (SCORE_FILE, CLASSIFIER_FILE):
        assert os.path.getsize(os.path.join(WEIGHTS_DIR, f)) < 2_000_000
    with open(os.path.join(WEIGHTS_DIR, META_FILE)) as f:
        meta = json.load(f)
    assert meta["metrics"]["classifier_test_acc"] >= MIN_CLEAN_ACC


def test_shipped_classifier_accuracy(models, test_split):
    _, clf = models
    u, y = test_split
    assert accuracy(clf, u, y) >= MIN_CLEAN_ACC


def test_shipped_score_model_denoises(models, test_split):
    score, _ = models
    u, _ = test_split
    losses = eval_dsm(score.eps_model, 2 * u - 1)
    for k, bound in MAX_SCORE_LOSS.items():
        assert losses[k] < bound, (k, losses[k])
    # the trivial predictor eps_hat = 0 scores 1.0 per dimension
    assert losses["mix"] < 0.5


def test_score_model_api(models, test_split):
    score, _ = models
    x = 2 * test_split[0][:4] - 1
    t = torch.tensor([0.01, 0.05, 0.1, 0.2])
    with torch.no_grad():
        s = score(x, t)
        s_scalar = score(x, 0.1)
        eps = score.eps_model(x, 999 * t)
    assert s.shape == x.shape
    torch.testing.assert_close(s, -eps / vp_sigma(t).view(-1, 1, 1, 1))
    torch.testing.assert_close(s_scalar[2], s[2])
    assert not any(p.requires_grad for p in score.parameters())


def test_retraining_lowers_the_loss():
    torch.manual_seed(0)
    u, y = load_digits("train")
    x0 = 2 * u[:256] - 1
    net = DigitsEpsNet()
    before = eval_dsm(net, x0)["mix"]
    ema, losses = train_score(net, x0, steps=40, batch=64, seed=0, progress=False)
    after = eval_dsm(net, x0)["mix"]
    assert after < 0.8 * before and sum(losses[-5:]) < sum(losses[:5])
    clf = DigitsClassifier()
    ce = train_classifier(clf, u[:256], y[:256], steps=30, batch=64, progress=False)
    assert sum(ce[-5:]) < sum(ce[:5])


def test_train_cli_writes_loadable_weights(tmp_path):
    main(["digits", "--out", str(tmp_path), "--steps", "3", "--clf-steps", "3", "--seed", "1"])
    with open(tmp_path / META_FILE) as f:
        meta = json.load(f)
    assert meta["training"]["score"]["steps"] == 3 and "score_test_loss" in meta["metrics"]
    score, clf = load_digits_models(weights_dir=str(tmp_path))
    x = torch.rand(2, 1, 8, 8)
    assert clf(x).shape == (2, 10) and score(2 * x - 1, 0.05).shape == (2, 1, 8, 8)
    assert not (tmp_path / CHECKPOINT_DIR).exists()  # a finished run leaves no checkpoints behind


def _interrupt_at_call(fn, n):
    """fn, except that its n-th call raises KeyboardInterrupt (a user's Ctrl-C mid-training)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("which", ["score", "classifier"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, which):
    """Killed after 5 of 7 steps (last checkpoint at 4) and rerun: bit-for-bit the uninterrupted run."""
    import coup_fast.train as train

    u, y = load_digits("train")
    u, y = u[:96], y[:96]

    def run(checkpoint=None):
        torch.manual_seed(0)
        if which == "score":
            ema, losses = train.train_score(DigitsEpsNet(), 2 * u - 1, 7, batch=16, progress=False,
                                            checkpoint=checkpoint, checkpoint_every=2)
            return ema.state_dict(), losses
        clf = DigitsClassifier()
        losses = train.train_classifier(clf, u, y, 7, batch=16, noise=0.2, progress=False, checkpoint=checkpoint,
                                        checkpoint_every=2)
        return clf.state_dict(), losses

    want_state, want_losses = run()
    path = str(tmp_path / "state.pt")
    hook = "dsm_loss" if which == "score" else "random_shift"
    with monkeypatch.context() as patch:
        patch.setattr(train, hook, _interrupt_at_call(getattr(train, hook), 6))
        with pytest.raises(KeyboardInterrupt):
            run(path)
    assert torch.load(path, weights_only=True)["step"] == 4
    state, losses = run(path)
    assert losses == want_losses
    for key, value in want_state.items():
        assert torch.equal(state[key], value), key


def test_checkpoint_of_another_run_is_refused(tmp_path):
    u, y = load_digits("train")
    path = str(tmp_path / "state.pt")
    train_classifier(DigitsClassifier(), u[:32], y[:32], 2, batch=8, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match="another run"):
        train_classifier(DigitsClassifier(), u[:32], y[:32], 3, batch=8, progress=False, checkpoint=path)


@pytest.mark.slow
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_purified_accuracy(models, test_split, lam):
    purify = pytest.importorskip("coup_fast").purify
    score, clf = models
    u, y = test_split
    out = purify(u, score, clf, t_star=0.1, lam=lam, generator=torch.Generator().manual_seed(0))
    assert out.shape == u.shape and 0.0 <= out.min() and out.max() <= 1.0
    acc = accuracy(clf, out, y)
    print(f"purified accuracy lam={lam}: {acc:.4f}")
    assert acc >= MIN_PURIFIED_ACC[lam]


# --- hardening: digits.json is checked before any network is built in memory; training refuses
# step counts that would save untrained weights and never writes into the package by default.


def _weights_copy(tmp_path, meta=None):
    """The shipped weight files in a fresh folder, with `meta` as its digits.json (None: no digits.json)."""
    import shutil

    d = tmp_path / "w"
    d.mkdir()
    for f in (SCORE_FILE, CLASSIFIER_FILE):
        shutil.copy(os.path.join(WEIGHTS_DIR, f), d / f)
    if meta is not None:
        (d / META_FILE).write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return str(d)


def test_crafted_architecture_is_refused_from_the_file_header_before_it_is_built(tmp_path, monkeypatch):
    """{"score_config": {"ch": 4000, "ch2": 8000}} used to build a 13.8 GB network before the mismatch."""
    built_on = []
    reset = torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self: built_on.append(self.weight.device.type) or reset(self))
    # a modest stand-in for the crafted sizes, so the unguarded loader survives it in a test
    d = _weights_copy(tmp_path, {"score_config": {"ch": 64, "ch2": 128}})
    with pytest.raises(ValueError, match=r"digits_score.safetensors: shape mismatch .*ch=64.*conv_in.weight is "
                                         r"\(16, 1, 3, 3\) in the file, \(64, 1, 3, 3\)"):
        load_digits_models(weights_dir=d)
    assert built_on and set(built_on) == {"meta"}  # nothing was allocated for the wrong architecture


@pytest.mark.parametrize("meta,key", [
    ({"score_confg": {"ch": 16}}, "'score_confg'"),                      # a mistyped section
    ({"score_config": {"ch": 16, "chh": 32}}, "score_config.chh"),       # a mistyped architecture key
    ({"classifier_config": {"hidden": "128"}}, "classifier_config.hidden"),  # a string for an int
    ({"classifier_config": {"ch": True}}, "classifier_config.ch"),
    ({"score_config": {"ch": -16}}, "score_config.ch"),
    ({"score_config": [16, 32]}, "score_config"),
    ({"metrics": 0.99}, "metrics"),
    ('{"score_config": {"ch": 16,', "not readable JSON"),
])
def test_digits_json_keys_and_types_are_checked(tmp_path, meta, key):
    d = _weights_copy(tmp_path, meta)
    with pytest.raises(ValueError, match=f"{META_FILE}: .*{key}" if "JSON" not in key else key) as e:
        load_digits_models(weights_dir=d)
    assert os.path.join(d, META_FILE) in str(e.value)


def test_weights_without_digits_json_load_with_the_default_architecture(tmp_path, models):
    score, clf = load_digits_models(weights_dir=_weights_copy(tmp_path))
    u = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    shipped_score, shipped_clf = models
    with torch.no_grad():
        torch.testing.assert_close(clf(u), shipped_clf(u), rtol=0, atol=0)
        torch.testing.assert_close(score(2 * u - 1, 0.05), shipped_score(2 * u - 1, 0.05), rtol=0, atol=0)


@pytest.mark.parametrize("argv,flag", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--clf-steps", "0"], "--clf-steps"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000000000000000000"], "--threads"),
])
def test_train_rejects_non_positive_counts(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(["digits", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and f"argument {flag}: expected an integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_library_rejects_zero_steps(tmp_path):
    from coup_fast.train import train_digits

    for name in ("steps", "clf_steps", "checkpoint_every"):
        with pytest.raises(ValueError, match=f"^{name}: expected an integer >= 1"):
            train_digits(str(tmp_path / "o"), **{name: 0})


def test_train_never_writes_into_the_package_by_default(tmp_path, monkeypatch, capsys):
    import coup_fast.train as train

    seen = {}
    monkeypatch.setattr(train, "train_digits", lambda out, **k: seen.update(out=out) or {"metrics": {}})
    monkeypatch.chdir(tmp_path)
    assert main(["digits"]) == 0
    assert os.path.abspath(seen["out"]) == str(tmp_path / "coup_fast_weights")
    assert not os.path.abspath(seen["out"]).startswith(os.path.dirname(WEIGHTS_DIR))
    out = capsys.readouterr().out  # says how to use what it wrote
    assert f"--weights-dir {tmp_path / 'coup_fast_weights'}" in out and "load_digits_models(weights_dir=" in out


def test_corrupt_training_checkpoint_names_the_file_and_suggests_restart(tmp_path, capsys):
    u, y = load_digits("train")
    path = tmp_path / CHECKPOINT_DIR / "classifier.pt"
    path.parent.mkdir()
    train_classifier(DigitsClassifier(), u[:32], y[:32], 2, batch=8, progress=False, checkpoint=str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    argv = ["digits", "--out", str(tmp_path), "--steps", "2", "--clf-steps", "2", "--threads", "1"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}: unreadable training checkpoint" in err and "--restart" in err
    assert main([*argv, "--restart"]) == 0 and (tmp_path / SCORE_FILE).exists()

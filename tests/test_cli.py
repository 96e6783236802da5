"""coup-fast eval: settings from flags and TOML/YAML files, validation that names the field before any work."""

import json

import pytest
import torch

from coup_fast.cli import ConfigError, EvalConfig, build_models, build_parser, config_from_args, main, validate


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["eval", *argv]))


def test_no_arguments_resolve_to_the_digits_preset():
    cfg = validate(_cfg([]))
    assert cfg.data == "digits" and cfg.threats == ["Linf"] and cfg.n_images > 0 and cfg.n_eval == 10
    # every purifier under every attacker gradient that applies to it: the worst case over them is the headline
    for gradient in ("", "@detached-guidance", "@adjoint", "@bpda"):
        assert "coup" + gradient in cfg.defenses
    assert {"diffpure@adjoint", "diffpure@bpda", "reverse@adjoint", "lm", "coup-lm", "coup-lm@bpda"} <= set(cfg.defenses)
    assert {"apgd-ce", "aa-rand", "pgd-eot"} <= set(cfg.attacks) and cfg.diagnostics


def test_cifar_preset_is_the_papers_setting(tmp_path):
    for name in ("cifar", "s.pth", "c.pt"):
        (tmp_path / name).write_text("")
    cfg = validate(EvalConfig(data="cifar10", cifar_dir=str(tmp_path / "cifar"), score_ckpt=str(tmp_path / "s.pth"),
                              classifier_ckpt=str(tmp_path / "c.pt")))
    assert (cfg.n_images, cfg.t_star_linf, cfg.t_star_l2, cfg.lam, cfg.dt) == (512, 0.1, 0.075, 1.0, 1e-3)
    assert cfg.eps_linf == pytest.approx(8 / 255) and cfg.eps_l2 == 0.5 and cfg.eot == 20
    # DiffPure's image subset, and the published attack and the detached guidance beside the exact one
    assert cfg.subset == "paper" and {"coup", "coup@adjoint", "coup@detached-guidance", "diffpure",
                                      "diffpure@adjoint"} <= set(cfg.defenses)


@pytest.mark.parametrize("argv,field", [
    (["--attacks", "apgd-ce,fgsm"], "attacks"),
    (["--eps-linf", "0"], "eps_linf"),
    (["--eps-l2", "-0.5"], "eps_l2"),
    (["--threats", "L1"], "threats"),
    (["--defenses", "coup,adv"], "defenses"),
    (["--gradient", "straight-through"], "gradient"),
    (["--defenses", "lm@adjoint"], "defenses"),  # the published attack is the SDE's adjoint
    (["--protocol", "carlini"], "protocol"),
    (["--lm-steps", "0"], "lm_steps"),
    (["--lm-rule", "sgd"], "lm_rule"),
    (["--eot-chunk", "0"], "eot_chunk"),
    (["--diag-images", "0"], "diag_images"),
    (["--ddpm-ckpt", "/x.pt"], "ddpm_ckpt"),  # digits use the shipped score model
    (["--engine", "jit"], "engine"),
    (["--n-iter", "0"], "n_iter"),
    (["--dt", "0.5"], "dt"),
    (["--data", "mnist"], "data"),
    (["--data", "cifar10", "--cifar-dir", "/nonexistent", "--score-ckpt", "/x", "--classifier-ckpt", "/y"],
     "cifar_dir"),
    (["--score-ckpt", "/x.pth"], "score_ckpt"),
    (["--defenses", "none,none@adjoint"], "defenses"),  # one row label: results would collapse
    (["--defenses", "coup,coup@exact"], "defenses"),
    pytest.param(["--device", "cuda"], "device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_settings_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=f"^--{field.replace('_', '-')}:"):
        validate(_cfg(argv))


def test_engine_reaches_every_purifier():
    from torch import nn

    cfg = validate(_cfg(["--engine", "compile", "--defenses", "none,coup,diffpure"]))
    models, _ = build_models(cfg, nn.Identity(), nn.Identity())
    purifiers = [m for per_threat in models.values() for m in per_threat.values() if hasattr(m, "purify_kwargs")]
    assert len(purifiers) == 2 * len(cfg.threats)
    assert all(m.purify_kwargs["engine"] == "compile" for m in purifiers)


def test_main_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--attacks", "nope", "--out", str(out)]) == 2
    assert "attacks:" in capsys.readouterr().err and not out.exists()


def test_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "wrn.pt").write_bytes(b"")
    argv = ["eval", "--data", "cifar10", "--cifar-dir", str(tmp_path / "cifar"), "--score-ckpt",
            str(tmp_path / "missing.pth"), "--classifier-ckpt", str(tmp_path / "wrn.pt"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--score-ckpt: no such file" in capsys.readouterr().err


def test_wrong_architecture_checkpoints(tmp_path, capsys, monkeypatch):
    (tmp_path / "cifar").mkdir()
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, tmp_path / "score.pth")
    torch.save({"fc.weight": torch.zeros(10, 4)}, tmp_path / "wrn.pt")
    base = ["eval", "--data", "cifar10", "--cifar-dir", str(tmp_path / "cifar"), "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert main(base + ["--score-ckpt", str(tmp_path / "score.pth"), "--classifier-ckpt", str(tmp_path / "wrn.pt")]) == 2
    err = capsys.readouterr().err
    assert "--score-ckpt: cannot load" in err and "NCSN++" in err
    assert not (tmp_path / "o").exists()
    # A good score model but a classifier file of another architecture.
    monkeypatch.setattr("coup_fast.models.ncsnpp.load_ncsnpp", lambda path, device="cpu": torch.nn.Identity())
    assert main(base + ["--score-ckpt", str(tmp_path / "score.pth"), "--classifier-ckpt", str(tmp_path / "wrn.pt")]) == 2
    err = capsys.readouterr().err
    assert "--classifier-ckpt: cannot load" in err and "WideResNet-28-10" in err
    assert not (tmp_path / "o").exists()


def test_digits_weights_and_subset_problems_name_the_field(tmp_path, capsys):
    (tmp_path / "w").mkdir()  # exists, but holds no weights
    base = ["eval", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    assert main(base + ["--weights-dir", str(tmp_path / "w")]) == 2
    assert "--weights-dir: cannot load the digits models" in capsys.readouterr().err
    assert main(base + ["--n-images", "5000"]) == 2
    assert "--n-images: the digits test split has" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_files_toml_and_yaml_with_flag_override(tmp_path):
    (tmp_path / "run.toml").write_text('attacks = ["apgd-ce", "bpda-eot"]\nn_images = 16\neps-linf = 0.2\n[extra]\n'
                                       .replace("[extra]\n", ""))
    cfg = validate(_cfg(["--config", str(tmp_path / "run.toml"), "--n-images", "8"]))
    assert cfg.attacks == ["apgd-ce", "bpda-eot"] and cfg.n_images == 8 and cfg.eps_linf == 0.2
    (tmp_path / "run.yaml").write_text("eval:\n  threats: [Linf, L2]\n  t_star: 0.05\n  dt: 0.01\n")
    cfg = validate(_cfg(["--config", str(tmp_path / "run.yaml")]))
    assert cfg.threats == ["Linf", "L2"] and cfg.t_star_linf == cfg.t_star_l2 == 0.05
    (tmp_path / "bad.toml").write_text("atacks = ['apgd-ce']\n")
    with pytest.raises(ConfigError, match="^--atacks:"):
        _cfg(["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "bad2.yaml").write_text("eps_linf: -1\n")
    with pytest.raises(ConfigError, match="^--eps-linf:"):
        validate(_cfg(["--config", str(tmp_path / "bad2.yaml")]))


def test_paper_subcommand_is_optional():
    parser = build_parser()
    assert parser.parse_args(["eval"]).command == "eval"


def _synthetic_cifar(root, n=10000, n_classes=10, name="cifar-10-batches-py", member="test_batch", label_key=b"labels"):
    """A CIFAR python-version test file of the real structure (random pixels)."""
    import pickle

    import numpy as np

    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"testing batch 1 of 1", label_key: rng.integers(0, n_classes, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    (d / member).write_bytes(pickle.dumps(batch, protocol=4))  # raw bytes (protocol 2 from Python 3 inflates them)
    return str(root)


@pytest.mark.slow
def test_cifar_preset_dry_run_with_architecture_sized_random_weights(tmp_path, capsys, monkeypatch):
    # The paper's CIFAR-10 protocol with full-size random NCSN++ deep and WRN-28-10 checkpoints, on the CPU:
    # every file is loaded strictly, a few steps of each kind are measured, the plan printed, nothing run.
    from safetensors.torch import save_file

    from coup_fast.models.ncsnpp import NCSNpp, ncsnpp_cifar10_deep
    from coup_fast.models.wideresnet import WideResNet

    from coup_fast import engines

    monkeypatch.setattr(engines.shutil, "which", lambda name: "/usr/bin/" + name)  # as if a C++ compiler were here
    torch.manual_seed(0)
    save_file(NCSNpp(ncsnpp_cifar10_deep()).state_dict(), str(tmp_path / "score.safetensors"))
    torch.save({f"module.{k}": v for k, v in WideResNet(28, 10).state_dict().items()}, tmp_path / "wrn.pt")
    cifar = _synthetic_cifar(tmp_path / "data")
    out = tmp_path / "o"
    argv = ["eval", "--data", "cifar10", "--cifar-dir", cifar, "--score-ckpt", str(tmp_path / "score.safetensors"),
            "--classifier-ckpt", str(tmp_path / "wrn.pt"), "--device", "cpu", "--out", str(out), "--dry-run",
            "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    # a CPU run of this size would compile its steps; the dry run says so and prices the eager engine
    assert "engine='compile'" in captured.err and "prices the eager engine" in captured.err
    assert "512 images of shape (3, 32, 32)" in text and "Nothing was run" in text and "H200" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "defense" not in line]
    # every defense x threat x (clean + attacks) of the preset has a row with a finite time, and its checks
    rows = [r for r in rows if "shared with" not in r]  # clean and bpda-eot run once per defense
    assert not any("nan" in r for r in rows)
    assert sum("check large-eps" in r for r in rows) == 7 * 2 and sum("check consistency" in r for r in rows) == 3 * 2
    # APGD-CE: 101 gradients per image (the start point and 100 iterations), R = 10 evaluations of 2 candidates
    assert any(r.startswith("| coup | Linf | apgd-ce | 100 | 20 | 101 |") for r in rows)
    assert any(r.startswith("| coup | L2 | apgd-ce | 75 |") for r in rows)
    assert not out.exists()  # a dry run writes nothing


def test_cifar100_preset_is_sec_5_2_1(tmp_path):
    """The DDPM variant: LM and COUP-LM on a DDPM (--ddpm-ckpt), APGD-CE at L-inf 8/255, 100-class WideResNets;
    no score model is needed unless an SDE defense is asked for."""
    for name in ("cifar", "s.pth", "c.pt", "ddpm.ckpt"):
        (tmp_path / name).write_text("")
    base = dict(data="cifar100", cifar_dir=str(tmp_path / "cifar"), classifier_ckpt=str(tmp_path / "c.pt"))
    cfg = validate(EvalConfig(**base, ddpm_ckpt=str(tmp_path / "ddpm.ckpt")))
    assert cfg.attacks == ["apgd-ce"] and cfg.threats == ["Linf"] and cfg.eps_linf == pytest.approx(8 / 255)
    assert (cfg.n_images, cfg.subset, cfg.lam) == (512, "paper", 1.0)
    assert {"lm", "coup-lm", "coup-lm@detached-guidance", "coup-lm@bpda"} <= set(cfg.defenses)
    with pytest.raises(ConfigError, match="^--ddpm-ckpt: required"):
        validate(EvalConfig(**base))
    with pytest.raises(ConfigError, match="^--score-ckpt: unused"):
        validate(EvalConfig(**base, ddpm_ckpt=str(tmp_path / "ddpm.ckpt"), score_ckpt=str(tmp_path / "s.pth")))
    with pytest.raises(ConfigError, match="^--score-ckpt: required"):
        validate(EvalConfig(**base, ddpm_ckpt=str(tmp_path / "ddpm.ckpt"), defenses="lm,coup"))
    cfg = validate(EvalConfig(**base, score_ckpt=str(tmp_path / "s.pth"), defenses="none,coup,coup@adjoint"))
    assert cfg.defenses == ["none", "coup", "coup@adjoint"]


def test_protocols_set_the_literatures_budgets_and_flags_still_win():
    lee = validate(_cfg(["--protocol", "lee-kim"]))
    assert (lee.attacks, lee.pgd_iter, lee.pgd_eot, lee.pgd_random_start) == (["pgd-eot"], 200, 20, True)
    assert lee.attack_settings().pgd_step_for(8 / 255) == pytest.approx(0.007)  # and scaled with eps:
    assert lee.attack_settings().pgd_step_for(0.15) == pytest.approx(0.007 * 0.15 / (8 / 255))
    rdc = validate(_cfg(["--protocol", "rdc"]))
    assert (rdc.pgd_iter, rdc.pgd_eot, rdc.pgd_random_start) == (200, 32, False)  # BIM: from the clean image
    both = validate(_cfg(["--protocol", "lee-kim,diffhammer-n10", "--pgd-iter", "50", "--n-eval", "3"]))
    assert (both.pgd_iter, both.n_eval, both.pgd_eot) == (50, 3, 20)  # flags over protocols over the preset
    paper = validate(_cfg(["--protocol", "paper"]))
    assert paper.attacks == ["aa", "bpda-eot"] and (paper.n_iter, paper.eot, paper.bpda_iter) == (100, 20, 20)
    assert validate(_cfg(["--protocol", "diffhammer-n10"])).n_eval == 10
    # strongest: lee-kim's PGD-EOT with the margin loss, then DiffAttack and DiffHammer at their papers' budgets
    strong = validate(_cfg(["--protocol", "strongest"]))
    assert strong.attacks == ["pgd-eot", "diffattack", "diffhammer"] and strong.loss == "margin"
    assert (strong.pgd_iter, strong.pgd_eot, strong.pgd_random_start) == (200, 20, True)
    assert strong.attack_settings().pgd_step_for(8 / 255) == pytest.approx(0.007)
    assert (strong.diffattack_iter, strong.diffattack_eot, strong.diffattack_lambda) == (100, 20, 1.0)  # Kang, App. D
    assert (strong.diffhammer_restarts, strong.diffhammer_iter, strong.diffhammer_n, strong.n_eval) == (3, 50, 10, 10)
    help_text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    for source in ("Lee & Kim 2023", "RDC", "DiffHammer", "2408.05900"):
        assert source in " ".join(help_text.split())


def test_lm_defenses_run_on_digits_with_the_worst_case(tmp_path, capsys):
    argv = ["eval", "--defenses", "none,lm,coup-lm,coup-lm@bpda", "--attacks", "apgd-ce", "--n-images", "6",
            "--batch-size", "6", "--n-iter", "2", "--n-eval", "2", "--lm-steps", "2", "--diag-images", "2",
            "--diag-draws", "2", "--pgd-eot", "2", "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| **coup-lm: worst case** |" in out and "| coup-lm@bpda |" in out and "| **lm** |" in out
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {r["defense"] for r in saved["rows"]} >= {"lm", "coup-lm", "coup-lm: worst case"}
    assert (tmp_path / "o" / "samples.csv").exists() and (tmp_path / "o" / "config.json").exists()


def test_digits_dry_run_counts_candidates_evaluations_and_checks(tmp_path, capsys):
    argv = ["eval", "--defenses", "none,coup,coup@bpda,lm", "--attacks", "apgd-ce,bpda-eot", "--n-images", "4",
            "--batch-size", "4", "--n-iter", "2", "--bpda-iter", "3", "--bpda-eot", "4", "--lm-steps", "2",
            "--device", "cpu", "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in text.splitlines() if line.startswith("| ")}
    # APGD-CE on COUP: 3 gradients (start + 2 iterations), 2 candidates x R = 10 evaluations; N = 5 steps
    assert rows[("coup", "Linf", "apgd-ce")].startswith("| coup | Linf | apgd-ce | 5 | 20 | 3 |")
    # BPDA-EOT: 3 iterations x 4 draws, 2 candidates x R; it does not depend on the row's gradient: run once
    assert rows[("coup", "Linf", "bpda-eot")].startswith("| coup | Linf | bpda-eot | 5 | 20 | 12 |")
    assert "shared with coup" in rows[("coup@bpda", "Linf", "bpda-eot")]
    assert rows[("lm", "Linf", "apgd-ce")].startswith("| lm | Linf | apgd-ce | 2 |")  # M = 2 LM steps
    assert rows[("none", "Linf", "apgd-ce")].startswith("| none | Linf | apgd-ce | 1 | 2 | 3 |")  # R = 1: deterministic
    assert ("coup", "Linf", "check consistency (4 images)") in rows
    assert ("none", "Linf", "check large-eps (4 images)") in rows
    assert "Nothing was run" in text and not (tmp_path / "o").exists()


def test_every_eval_flag_has_help():
    import argparse

    parser = build_parser()
    eval_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    missing = [a.option_strings for a in eval_parser._actions if a.option_strings and not a.help]
    assert not missing


def test_auto_engine_compiles_only_when_the_run_pays_for_it(monkeypatch):
    """engine 'auto' on a CPU: 'compile' when (calls per batch shape) x (saving per call) beats the compile time,
    counted from the run's own plan and one measured step; explicit engines and the bare classifier untouched."""
    from coup_fast import cli, engines
    from coup_fast.models import load_digits_models
    from coup_fast.data import load_digits

    monkeypatch.setattr(engines.shutil, "which", lambda name: "/usr/bin/" + name)  # a C++ compiler
    score, clf = load_digits_models()
    x, y = load_digits("test", n=4)

    def choice(argv, compile_seconds):
        cfg = validate(_cfg(["--n-images", "4", "--batch-size", "4", "--device", "cpu", *argv]))
        models, _ = build_models(cfg, score, clf)
        monkeypatch.setattr(cli, "choose_engine", lambda *a, **k: engines.choose_engine(
            *a, compile_seconds=compile_seconds, **k))
        return cli.choose_eval_engine(cfg, models, x, y)

    few = choice(["--defenses", "none,coup", "--attacks", "apgd-ce", "--n-iter", "2"], compile_seconds=1e6)
    many = choice(["--defenses", "none,coup", "--attacks", "apgd-ce", "--n-iter", "2"], compile_seconds=1e-6)
    assert (few.engine, few.compiles, many.engine, many.compiles) == ("eager", False, "compile", True)
    # clean: one batched call of R draws; APGD-CE: a gradient at the start point and one per iteration (3), then
    # its 2 candidates' R evaluations (one batched call each)
    assert "6 calls per shape" in few.reason
    assert "compiling" in many.reason
    assert choice(["--defenses", "none,coup", "--engine", "eager"], 1e-6) is None  # explicit: kept
    assert choice(["--defenses", "none,lm"], 1e-6) is None  # LM runs eagerly whatever the engine
    cfg = validate(_cfg(["--n-images", "4", "--defenses", "none,coup,lm", "--device", "cpu"]))
    models, _ = build_models(cfg, score, clf, sde_engine="compile")
    assert models["coup"]["Linf"].purify_kwargs["engine"] == "compile"
    assert models["lm"]["Linf"].purify_kwargs["engine"] == "auto"

"""coup-fast eval: settings from flags and TOML/YAML files, validation that names the field before any work."""

import pytest
import torch

from coup_fast.cli import ConfigError, EvalConfig, build_models, build_parser, config_from_args, main, validate


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["eval", *argv]))


def test_no_arguments_resolve_to_the_digits_preset():
    cfg = validate(_cfg([]))
    assert cfg.data == "digits" and cfg.threats == ["Linf"] and cfg.n_images > 0
    assert "coup" in cfg.defenses and "coup@detached-guidance" in cfg.defenses
    assert {"apgd-ce", "aa-rand"} <= set(cfg.attacks)


def test_cifar_preset_is_the_papers_setting(tmp_path):
    for name in ("cifar", "s.pth", "c.pt"):
        (tmp_path / name).write_text("")
    cfg = validate(EvalConfig(data="cifar10", cifar_dir=str(tmp_path / "cifar"), score_ckpt=str(tmp_path / "s.pth"),
                              classifier_ckpt=str(tmp_path / "c.pt")))
    assert (cfg.n_images, cfg.t_star_linf, cfg.t_star_l2, cfg.lam, cfg.dt) == (512, 0.1, 0.075, 1.0, 1e-3)
    assert cfg.eps_linf == pytest.approx(8 / 255) and cfg.eps_l2 == 0.5 and cfg.eot == 20


@pytest.mark.parametrize("argv,field", [
    (["--attacks", "apgd-ce,fgsm"], "attacks"),
    (["--eps-linf", "0"], "eps_linf"),
    (["--eps-l2", "-0.5"], "eps_l2"),
    (["--threats", "L1"], "threats"),
    (["--defenses", "coup,adv"], "defenses"),
    (["--gradient", "bpda"], "gradient"),
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
    with pytest.raises(ConfigError, match=f"^{field}:"):
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
    assert "score_ckpt: no such file" in capsys.readouterr().err


def test_wrong_architecture_checkpoints(tmp_path, capsys, monkeypatch):
    (tmp_path / "cifar").mkdir()
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, tmp_path / "score.pth")
    torch.save({"fc.weight": torch.zeros(10, 4)}, tmp_path / "wrn.pt")
    base = ["eval", "--data", "cifar10", "--cifar-dir", str(tmp_path / "cifar"), "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert main(base + ["--score-ckpt", str(tmp_path / "score.pth"), "--classifier-ckpt", str(tmp_path / "wrn.pt")]) == 2
    err = capsys.readouterr().err
    assert "score_ckpt: cannot load" in err and "NCSN++" in err
    assert not (tmp_path / "o").exists()
    # A good score model but a classifier file of another architecture.
    monkeypatch.setattr("coup_fast.models.ncsnpp.load_ncsnpp", lambda path, device="cpu": torch.nn.Identity())
    assert main(base + ["--score-ckpt", str(tmp_path / "score.pth"), "--classifier-ckpt", str(tmp_path / "wrn.pt")]) == 2
    err = capsys.readouterr().err
    assert "classifier_ckpt: cannot load" in err and "WideResNet-28-10" in err
    assert not (tmp_path / "o").exists()


def test_digits_weights_and_subset_problems_name_the_field(tmp_path, capsys):
    (tmp_path / "w").mkdir()  # exists, but holds no weights
    base = ["eval", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    assert main(base + ["--weights-dir", str(tmp_path / "w")]) == 2
    assert "weights_dir: cannot load the digits models" in capsys.readouterr().err
    assert main(base + ["--n-images", "5000"]) == 2
    assert "n_images: the digits test split has" in capsys.readouterr().err
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
    with pytest.raises(ConfigError, match="^atacks:"):
        _cfg(["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "bad2.yaml").write_text("eps_linf: -1\n")
    with pytest.raises(ConfigError, match="^eps_linf:"):
        validate(_cfg(["--config", str(tmp_path / "bad2.yaml")]))


def test_paper_subcommand_is_optional():
    parser = build_parser()
    assert parser.parse_args(["eval"]).command == "eval"

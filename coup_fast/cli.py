"""`coup-fast` command line: `eval` (robustness grid, this file) and `paper` (coup_fast.paper.cli).

    coup-fast eval                                  # embedded digits models, small seeded subset
    coup-fast eval --config run.toml --n 128        # settings from TOML/YAML, flags override
    coup-fast eval --data cifar10 --cifar-dir D --score-ckpt checkpoint_8.pth --classifier-ckpt wrn.pt
    torchrun --nproc_per_node=K -m coup_fast.cli eval ...   # batches sharded over ranks

Every setting is a field of `EvalConfig`; a config file uses the same names (dashes or
underscores).  Bad settings fail before any work with a message naming the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

from .attacks import ATTACKS, NORMS, AttackSettings
from .evaluate import ATTACK_GRADIENTS, DEFENSES, Defense
from .graphs import ENGINES

DATASETS = ("digits", "cifar10")

# Defaults per data set.  Digits: sized to finish in < 10 min on 2 shared CPU cores: 32 seeded
# test images in one batch, dt = 0.02 (5 Euler steps over t* = 0.1 instead of the paper's 100),
# APGD 5 iterations, EOT 2 for AutoAttack 'rand', R = 4 purifications of each final batch.
# eps: the digits are 8x8 in [0, 1] with 17 grey levels (steps of 1/16); APGD-CE (20 it.) on the
# shipped bare classifier (99.3 % clean, 300 test images) leaves 98 / 92 / 60 / 16 / 1 % at L-inf eps
# 0.03 / 0.05 / 0.1 / 0.15 / 0.2, and 92 / 64 / 2 % at L2 eps 0.25 / 0.5 / 1.0.  L-inf 0.15 (about
# 2.4 grey levels) breaks the bare classifier while the digits stay legible; L2 1.0 likewise.
# CIFAR-10: the paper's setting (512 images, t* = 0.1 for L-inf and 0.075 for L2, lam = 1,
# dt = 1e-3, full AutoAttack budgets).
PRESETS = {
    "digits": dict(n_images=32, batch_size=32, eps_linf=0.15, eps_l2=1.0, t_star_linf=0.1, t_star_l2=0.1, dt=2e-2,
                   n_iter=5, eot=2, pgd_iter=10, pgd_eot=2, bpda_iter=20, bpda_eot=2, fab_iter=10,
                   square_queries=100, n_eval=4,
                   defenses=["none", "diffpure", "reverse", "coup", "coup@detached-guidance"],
                   attacks=["apgd-ce", "aa-rand"], threats=["Linf"]),
    "cifar10": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075, dt=1e-3,
                    n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                    square_queries=5000, n_eval=4,
                    defenses=["none", "diffpure", "reverse", "coup", "coup@detached-guidance"],
                    attacks=["aa", "apgd-ce", "bpda-eot"], threats=["Linf", "L2"]),
}


class ConfigError(ValueError):
    """A bad setting; the message starts with the field's name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.field = name


@dataclass
class EvalConfig:
    """Settings of `coup-fast eval`.  None means: the data set's preset (PRESETS)."""

    data: str = "digits"
    n_images: int | None = None             # evaluation images (seeded subset)
    batch_size: int | None = None
    seed: int = 0
    defenses: list | None = None            # DEFENSES, optionally name@gradient
    attacks: list | None = None             # attacks.ATTACKS
    threats: list | None = None             # Linf, L2
    eps_linf: float | None = None
    eps_l2: float | None = None
    t_star: float | None = None             # overrides both per-threat values below
    t_star_linf: float | None = None
    t_star_l2: float | None = None
    lam: float = 1.0
    dt: float | None = None
    gradient: str = "exact"                 # attacker gradient of defenses without @gradient
    engine: str = "auto"                    # purify's engine (not in the resume hash: engines agree to round-off)
    n_iter: int | None = None               # APGD iterations
    eot: int | None = None                  # AutoAttack-rand EOT samples
    n_restarts: int = 1
    n_target_classes: int = 9
    fab_iter: int | None = None
    square_queries: int | None = None
    pgd_iter: int | None = None
    pgd_step: float | None = None
    pgd_eot: int | None = None
    bpda_iter: int | None = None
    bpda_step: float | None = None
    bpda_eot: int | None = None
    n_eval: int | None = None               # R: purifications of each final adversarial batch
    out: str = "coup_fast_eval"
    device: str = "auto"
    cifar_dir: str | None = None
    score_ckpt: str | None = None
    classifier_ckpt: str | None = None
    weights_dir: str | None = None          # digits: directory of the digits weights (default: shipped)
    wrn_depth: int = 28
    wrn_widen: int = 10
    progress: bool = True

    def resolved(self) -> "EvalConfig":
        """A copy with the data set's preset filled in for every None field."""
        if self.data not in DATASETS:
            raise ConfigError("data", f"expected one of {DATASETS}, got {self.data!r}")
        cfg = dataclasses.replace(self)
        for name, value in PRESETS[self.data].items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, list(value) if isinstance(value, list) else value)
        if cfg.t_star is not None:
            cfg.t_star_linf = cfg.t_star_l2 = cfg.t_star
        return cfg

    def attack_settings(self) -> AttackSettings:
        names = {f.name for f in fields(AttackSettings)}
        return AttackSettings(**{k: getattr(self, k) for k in names})


_POSITIVE_INT = ("n_images", "batch_size", "n_iter", "eot", "n_restarts", "n_target_classes", "fab_iter", "square_queries",
                 "pgd_iter", "pgd_eot", "bpda_iter", "bpda_eot", "n_eval", "wrn_depth", "wrn_widen")
_POSITIVE_FLOAT = ("eps_linf", "eps_l2", "t_star_linf", "t_star_l2", "dt", "bpda_step", "pgd_step")


def _as_list(cfg, name):
    value = getattr(cfg, name)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(name, f"expected a non-empty list, got {value!r}")
    setattr(cfg, name, list(value))


def validate(cfg: EvalConfig) -> EvalConfig:
    """Resolve presets and check every field; raise ConfigError naming the first bad one."""
    cfg = cfg.resolved()
    for name in ("defenses", "attacks", "threats"):
        _as_list(cfg, name)
    for a in cfg.attacks:
        if a not in ATTACKS:
            raise ConfigError("attacks", f"unknown attack {a!r}; expected one of {ATTACKS}")
    for t in cfg.threats:
        if t not in NORMS:
            raise ConfigError("threats", f"unknown threat model {t!r}; expected one of {NORMS}")
    if cfg.gradient not in ATTACK_GRADIENTS:
        raise ConfigError("gradient", f"expected one of {ATTACK_GRADIENTS}, got {cfg.gradient!r}")
    if cfg.engine not in ENGINES:
        raise ConfigError("engine", f"expected one of {ENGINES}, got {cfg.engine!r}")
    labels = []
    for spec in cfg.defenses:
        try:
            labels.append(Defense.parse(spec, gradient=cfg.gradient).label)
        except ValueError as e:
            raise ConfigError("defenses", str(e).removeprefix("defenses: ")) from None
    if len(set(labels)) != len(labels):  # rows are keyed by label: e.g. none and none@adjoint are one row
        raise ConfigError("defenses", f"listed twice: {cfg.defenses} are the rows {labels}")
    for name in _POSITIVE_INT:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(name, f"expected an integer > 0, got {v!r}")
    for name in _POSITIVE_FLOAT:
        v = getattr(cfg, name)
        if v is None and name in ("pgd_step", "bpda_step"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(name, f"expected a number > 0, got {v!r}")
    for name in ("t_star_linf", "t_star_l2"):
        if getattr(cfg, name) > 1:
            raise ConfigError(name, f"expected t* in (0, 1], got {getattr(cfg, name)!r}")
        if cfg.dt > getattr(cfg, name):
            raise ConfigError("dt", f"expected dt <= {name} = {getattr(cfg, name)}, got {cfg.dt!r}")
    if not (isinstance(cfg.lam, (int, float)) and math.isfinite(cfg.lam) and cfg.lam >= 0):
        raise ConfigError("lam", f"expected a finite number >= 0, got {cfg.lam!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError("seed", f"expected an integer, got {cfg.seed!r}")
    if cfg.device != "auto":
        import torch

        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError("device", f"not a torch device: {cfg.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{cfg.device!r}: this machine has no CUDA device (use cpu or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError("device", f"{cfg.device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if cfg.data == "cifar10":
        for name in ("cifar_dir", "score_ckpt", "classifier_ckpt"):
            p = getattr(cfg, name)
            if p is None:
                raise ConfigError(name, "required with data = cifar10")
            if not os.path.exists(p):
                raise ConfigError(name, f"no such file or directory: {p!r}")
    else:
        if cfg.weights_dir is not None and not os.path.isdir(cfg.weights_dir):
            raise ConfigError("weights_dir", f"no such directory: {cfg.weights_dir!r}")
        for name in ("cifar_dir", "score_ckpt", "classifier_ckpt"):
            if getattr(cfg, name) is not None:
                raise ConfigError(name, f"only used with data = cifar10 (data is {cfg.data!r})")
    return cfg


def read_config_file(path: str) -> dict:
    """Settings from a TOML (.toml) or YAML (.yaml/.yml) file; keys are EvalConfig fields."""
    if not os.path.isfile(path):
        raise ConfigError("config", f"no such file: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
                import tomli as tomllib

            doc = tomllib.loads(raw.decode())
        else:
            import yaml

            doc = yaml.safe_load(raw) or {}
    except Exception as e:  # parse errors of either format
        raise ConfigError("config", f"cannot parse {path!r}: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("eval"), dict):
        doc = doc["eval"]
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{path!r}: expected a table/mapping of settings")
    known = {f.name for f in fields(EvalConfig)}
    out = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(name, f"unknown setting in {path!r}; expected one of {sorted(known)}")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------- building

def _device(cfg):
    import torch

    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", _local_cuda_index())
    return torch.device("cpu")


def _local_cuda_index() -> int:
    """This process's GPU: torchrun's LOCAL_RANK (0 without torchrun)."""
    import torch

    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        raise ConfigError("device", f"torchrun's local rank {local} has no GPU of its own: this node has {count} "
                                    f"CUDA device(s); start at most {count} processes per node "
                                    f"(--nproc_per_node) or pass --device cpu")
    return local


def load_everything(cfg: EvalConfig, device):
    """(score_model, classifier, x, y); checkpoint problems become ConfigErrors naming the field."""
    if cfg.data == "digits":
        from .data import load_digits
        from .models import load_digits_models

        try:
            score_model, classifier = load_digits_models(device=device, weights_dir=cfg.weights_dir)
        except Exception as e:
            raise ConfigError("weights_dir", f"cannot load the digits models from {cfg.weights_dir or 'the shipped weights'}: {e}") from None
        try:
            x, y = load_digits("test", n=cfg.n_images, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError("n_images", str(e).removeprefix("n_images: ")) from None
    else:
        from .data import load_cifar
        from .models.ncsnpp import load_ncsnpp
        from .models.wideresnet import load_wideresnet

        try:
            score_model = load_ncsnpp(cfg.score_ckpt, device=device)
        except Exception as e:
            raise ConfigError("score_ckpt", f"cannot load {cfg.score_ckpt!r} as the NCSN++ score model: {e}") from None
        try:
            classifier = load_wideresnet(cfg.classifier_ckpt, cfg.wrn_depth, cfg.wrn_widen, device=device)
        except Exception as e:
            raise ConfigError("classifier_ckpt", f"cannot load {cfg.classifier_ckpt!r} as WideResNet-"
                                                 f"{cfg.wrn_depth}-{cfg.wrn_widen}: {e}") from None
        try:
            x, y = load_cifar(cfg.cifar_dir, "test", n=cfg.n_images, seed=cfg.seed)
        except Exception as e:
            raise ConfigError("cifar_dir", str(e)) from None
        if cfg.n_images > x.shape[0]:
            raise ConfigError("n_images", f"the test split has {x.shape[0]} images, got {cfg.n_images}")
        for m in (score_model, classifier):
            m.to(device).eval().requires_grad_(False)
    return score_model, classifier, x.to(device), y.to(device)


def build_models(cfg: EvalConfig, score_model, classifier) -> tuple[dict, dict]:
    """{label: {threat: model}} and the specs they stand for (folded into the resume hash)."""
    from .evaluate import build_defense

    t_star = {"Linf": cfg.t_star_linf, "L2": cfg.t_star_l2}
    models, specs = {}, {}
    for spec in cfg.defenses:
        per_threat = {}
        for threat in cfg.threats:
            d = Defense.parse(spec, t_star=t_star[threat], lam=cfg.lam, dt=cfg.dt, gradient=cfg.gradient)
            per_threat[threat] = build_defense(d, score_model, classifier, engine=cfg.engine)
            # The bare classifier does not depend on the purifier settings.
            specs.setdefault(d.label, {})[threat] = {"name": "none"} if d.name == "none" else dataclasses.asdict(d)
        models[d.label] = per_threat
    return models, specs


# ----------------------------------------------------------------------------------------------- commands

def add_eval_parser(subparsers):
    p = subparsers.add_parser("eval", help="robust accuracy: defenses x attacks x threat models",
                              description="Robust accuracy of COUP and baselines (paper Tables 1-3). "
                                          "Without arguments: embedded digits models on a small seeded subset.")
    p.add_argument("--config", help="TOML or YAML file of settings (field names as below); flags override it")
    helps = {"defenses": f"comma list of {DEFENSES}, each optionally @gradient ({ATTACK_GRADIENTS})",
             "attacks": f"comma list of {ATTACKS}", "threats": f"comma list of {NORMS}",
             "data": f"one of {DATASETS}", "gradient": f"attacker gradient, one of {ATTACK_GRADIENTS}",
             "engine": f"purify's engine, one of {ENGINES} ('compile': torch.compile'd steps, the CPU's fast path)",
             "n_eval": "R: purifications of each final adversarial batch (mean and worst case)",
             "out": "output directory (per-batch results, results.json/.md/.csv)"}
    for f in fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)
            continue
        kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=helps.get(f.name))
    p.set_defaults(func=run_eval)
    return p


def config_from_args(args) -> EvalConfig:
    values = read_config_file(args.config) if args.config else {}
    for f in fields(EvalConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        return EvalConfig(**values)
    except TypeError as e:
        raise ConfigError("config", str(e)) from None


def _init_distributed(device) -> bool:
    """Join torchrun's process group: NCCL when this run computes on a GPU, gloo on the CPU."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else _local_cuda_index())
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def run_eval(args) -> int:
    cfg = validate(config_from_args(args))
    device = _device(cfg)
    started = _init_distributed(device)
    import torch

    from .evaluate import evaluate

    try:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        t0 = time.perf_counter()
        score_model, classifier, x, y = load_everything(cfg, device)
        models, specs = build_models(cfg, score_model, classifier)
        eps = {"Linf": cfg.eps_linf, "L2": cfg.eps_l2}
        table = evaluate(models, x, y, attacks=cfg.attacks, threats=cfg.threats, eps=eps,
                         settings=cfg.attack_settings(), n_eval=cfg.n_eval, batch_size=cfg.batch_size,
                         seed=cfg.seed, out_dir=cfg.out, tag={"data": cfg.data}, specs=specs,
                         progress=cfg.progress)
        if rank == 0:
            wall = time.perf_counter() - t0
            print()
            print(table.to_markdown())
            print(f"\n{cfg.data}: n = {x.shape[0]}, defenses {len(models)}, attacks {len(cfg.attacks)}, "
                  f"threats {len(cfg.threats)}; wall {wall:.0f} s; results in {os.path.join(cfg.out, 'results.{json,md,csv}')}")
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coup-fast", description="COUP purification: evaluation and paper runs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    try:
        from .paper.cli import register as register_paper
    except ImportError:
        register_paper = None
    if register_paper is not None:
        register_paper(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"coup-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coup-fast {args.command}: interrupted; finished batches are kept, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
from dataclasses import dataclass, field, fields

import torch

from . import data, plan
from .attacks import ATTACKS, NORMS, AttackSettings
from .engines import CHOICES as ENGINES
from .evaluate import ATTACK_GRADIENTS, DEFENSES, Defense, build_defense, evaluate
from .models import digits, ncsnpp, wideresnet
from .paper.cli import register as register_paper
from .sde import DIFFUSION_SCHEDULES, ReverseGrid

DATASETS = ("digits", "cifar10", "cifar100")
SUBSETS = ("paper", "seeded")  # coup_fast.data.load_cifar's subsets: DiffPure's numpy choice, or a torch permutation
LAYOUTS = ("robustbench", "diffpure", "dm")  # coup_fast.models.wideresnet.load_wideresnet's layouts

# Defaults per data set.  Digits: sized to finish in < 10 min on 2 shared CPU cores: 32 seeded
# test images in one batch, dt = 0.02 (5 Euler steps over t* = 0.1 instead of the paper's 100),
# APGD 5 iterations, EOT 2 for AutoAttack 'rand', R = 4 purifications of each final batch.
# eps: the digits are 8x8 in [0, 1] with 17 grey levels (steps of 1/16); APGD-CE (20 it.) on the
# shipped bare classifier (99.3 % clean, 300 test images) leaves 98 / 92 / 60 / 16 / 1 % at L-inf eps
# 0.03 / 0.05 / 0.1 / 0.15 / 0.2, and 92 / 64 / 2 % at L2 eps 0.25 / 0.5 / 1.0.  L-inf 0.15 (about
# 2.4 grey levels) breaks the bare classifier while the digits stay legible; L2 1.0 likewise.
# CIFAR-10: the paper's protocol as its official code runs it (Sec. 5.1; DiffPure's settings): the 512
# test images np.random.RandomState(0).choice(10000, 512, replace=False), t* = 0.1 for L-inf and 0.075
# for L2, lam = 1, dt = 1e-3, full AutoAttack budgets (standard and rand, EOT 20), BPDA+EOT (PGD-20), and
# every purifier attacked both with the exact gradient and with the published one ('@adjoint').
# CIFAR-100: Sec. 5.2.1's setting (APGD-CE, L-inf 8/255, 100-class WideResNets), same subset rule.
_PAPER_DEFENSES = ["none", "diffpure", "diffpure@adjoint", "reverse", "coup", "coup@adjoint"]
PRESETS = {
    "digits": dict(n_images=32, batch_size=32, eps_linf=0.15, eps_l2=1.0, t_star_linf=0.1, t_star_l2=0.1, dt=2e-2,
                   n_iter=5, eot=2, pgd_iter=10, pgd_eot=2, bpda_iter=20, bpda_eot=2, fab_iter=10,
                   square_queries=100, n_eval=4, threads=1,
                   defenses=["none", "diffpure", "reverse", "coup", "coup@detached-guidance"],
                   attacks=["apgd-ce", "aa-rand"], threats=["Linf"]),
    "cifar10": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075, dt=1e-3,
                    n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                    square_queries=5000, n_eval=4, defenses=_PAPER_DEFENSES, attacks=["aa", "apgd-ce", "bpda-eot"],
                    threats=["Linf", "L2"]),
    "cifar100": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075,
                     dt=1e-3, n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                     square_queries=5000, n_eval=4, defenses=["none", "reverse", "coup", "coup@adjoint"],
                     attacks=["apgd-ce"], threats=["Linf"]),
}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


class ConfigError(ValueError):
    """A bad setting; the message starts with the field's name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.field = name


def _setting(default, help: str):
    """A field of EvalConfig with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    """Settings of `coup-fast eval`.  None means: the data set's preset (PRESETS)."""

    data: str = _setting("digits", f"data set and preset, one of {DATASETS}")
    n_images: int | None = _setting(None, "evaluation images (the data set's subset; digits 32, CIFAR 512)")
    subset: str = _setting("paper", f"CIFAR image subset, one of {SUBSETS}: 'paper' = DiffPure's and COUP's "
                                    "np.random.RandomState(seed).choice(10000, n, replace=False); 'seeded' = a torch "
                                    "permutation of seed")
    batch_size: int | None = _setting(None, "images per attack batch (digits 32, CIFAR 64)")
    seed: int = _setting(0, "seed of the image subset and of every batch's attack and purification noise")
    defenses: list | None = _setting(None, "comma list of defenses " + str(DEFENSES) + ", each optionally "
                                           "@gradient, the attacker's gradient " + str(ATTACK_GRADIENTS) + "; "
                                           "'@adjoint' is the published COUP / DiffPure attack")
    attacks: list | None = _setting(None, f"comma list of attacks {ATTACKS}")
    threats: list | None = _setting(None, f"comma list of threat models {NORMS}")
    eps_linf: float | None = _setting(None, "L-inf radius in [0, 1] pixel units (digits 0.15, CIFAR 8/255)")
    eps_l2: float | None = _setting(None, "L2 radius (digits 1.0, CIFAR 0.5)")
    t_star: float | None = _setting(None, "purification time t*, overriding both per-threat values below")
    t_star_linf: float | None = _setting(None, "t* under L-inf (paper: 0.1)")
    t_star_l2: float | None = _setting(None, "t* under L2 (paper: 0.075)")
    lam: float = _setting(1.0, "guidance weight lambda of COUP (paper: 1)")
    dt: float | None = _setting(None, "Euler-Maruyama step; N = t*/dt steps (digits 0.02, CIFAR 1e-3)")
    diffusion: str = _setting("ddpm", "DiffPure's forward diffusion: 'ddpm' (its code's discrete schedule) or 'vp' "
                                      "(the continuous marginal)")
    gradient: str = _setting("exact", f"attacker gradient of defenses given without @gradient, one of {ATTACK_GRADIENTS}")
    engine: str = _setting("auto", f"purify's engine, one of {ENGINES} ('compile': torch.compile'd steps, the CPU's "
                                   "fast path); not in the resume hash, engines agree to round-off")
    n_iter: int | None = _setting(None, "APGD iterations, in apgd-ce and inside AutoAttack (paper: 100)")
    eot: int | None = _setting(None, "EOT draws per gradient of AutoAttack 'rand' (paper: 20)")
    n_restarts: int = _setting(1, "APGD restarts")
    n_target_classes: int = _setting(9, "target classes of APGD-T and FAB-T in AutoAttack 'standard'")
    fab_iter: int | None = _setting(None, "FAB-T iterations (AutoAttack 'standard')")
    square_queries: int | None = _setting(None, "Square queries (AutoAttack 'standard')")
    pgd_iter: int | None = _setting(None, "pgd-eot iterations")
    pgd_step: float | None = _setting(None, "pgd-eot step (default 2.5 eps / iterations)")
    pgd_eot: int | None = _setting(None, "pgd-eot EOT draws per gradient")
    bpda_iter: int | None = _setting(None, "bpda-eot iterations (paper: PGD-20)")
    bpda_step: float | None = _setting(None, "bpda-eot step (default 0.007 at L-inf 8/255, scaled with eps)")
    bpda_eot: int | None = _setting(None, "bpda-eot EOT draws per gradient")
    n_eval: int | None = _setting(None, "R: purifications of each final adversarial batch (mean and worst case)")
    out: str = _setting("coup_fast_eval", "output directory: per-batch results (resume), results.json/.md/.csv")
    device: str = _setting("auto", "torch device (auto: this rank's GPU if there is one, else cpu)")
    threads: int | None = _setting(None, "torch CPU threads (digits: 1, the tiny nets run fastest so on a shared "
                                         "machine; otherwise the cores divided by torchrun's local ranks)")
    cifar_dir: str | None = _setting(None, "CIFAR python-version directory or .tar.gz (coup_fast.data.load_cifar)")
    score_ckpt: str | None = _setting(None, "Score SDE NCSN++ checkpoint: checkpoint_8.pth, a {'model', 'ema'} dict "
                                            "or .safetensors (coup_fast.models.load_ncsnpp)")
    classifier_ckpt: str | None = _setting(None, "WideResNet checkpoint (coup_fast.models.load_wideresnet)")
    classifier_layout: str | None = _setting(None, f"the checkpoint's WideResNet layout, one of {LAYOUTS} (default: "
                                                   "detected from its keys; see load_wideresnet)")
    weights_dir: str | None = _setting(None, "digits: directory of the digits weights (default: the shipped ones)")
    wrn_depth: int = _setting(28, "WideResNet depth (28, or 70 for WRN-70-16)")
    wrn_widen: int = _setting(10, "WideResNet widen factor (10, or 16 for WRN-70-16)")
    dry_run: bool = _setting(False, "validate every file and setting, measure a few steps, print the plan "
                                    "(purifications and gradients per attack, estimated time, sharding) and exit")
    progress: bool = _setting(True, "progress bars (--no-progress turns them off)")

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
        if cfg.threads is None:  # the cores, shared by the ranks torchrun starts on this node
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            cfg.threads = max(1, (os.cpu_count() or 1) // max(local_ranks, 1))
        return cfg

    def attack_settings(self) -> AttackSettings:
        names = {f.name for f in fields(AttackSettings)}
        return AttackSettings(**{k: getattr(self, k) for k in names})


_POSITIVE_INT = ("n_images", "batch_size", "n_iter", "eot", "n_restarts", "n_target_classes", "fab_iter", "square_queries",
                 "pgd_iter", "pgd_eot", "bpda_iter", "bpda_eot", "n_eval", "wrn_depth", "wrn_widen", "threads")
_CHOICES = {"subset": SUBSETS, "diffusion": DIFFUSION_SCHEDULES, "gradient": ATTACK_GRADIENTS, "engine": ENGINES}
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
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(name, f"expected one of {choices}, got {getattr(cfg, name)!r}")
    if cfg.classifier_layout is not None and cfg.classifier_layout not in LAYOUTS:
        raise ConfigError("classifier_layout", f"expected one of {LAYOUTS} (or unset: detected), got {cfg.classifier_layout!r}")
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
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError("device", f"not a torch device: {cfg.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{cfg.device!r}: this machine has no CUDA device (use cpu or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError("device", f"{cfg.device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if cfg.data != "digits":
        for name in ("cifar_dir", "score_ckpt", "classifier_ckpt"):
            p = getattr(cfg, name)
            if p is None:
                raise ConfigError(name, f"required with data = {cfg.data}")
            if not os.path.exists(p):
                raise ConfigError(name, f"no such file or directory: {p!r}")
        if cfg.weights_dir is not None:
            raise ConfigError("weights_dir", f"only used with data = digits (data is {cfg.data!r})")
    else:
        if cfg.weights_dir is not None and not os.path.isdir(cfg.weights_dir):
            raise ConfigError("weights_dir", f"no such directory: {cfg.weights_dir!r}")
        for name in ("cifar_dir", "score_ckpt", "classifier_ckpt", "classifier_layout"):
            if getattr(cfg, name) is not None:
                raise ConfigError(name, f"only used with CIFAR data (data is {cfg.data!r})")
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
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", _local_cuda_index())
    return torch.device("cpu")


def _local_cuda_index() -> int:
    """This process's GPU: torchrun's LOCAL_RANK (0 without torchrun)."""
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        raise ConfigError("device", f"torchrun's local rank {local} has no GPU of its own: this node has {count} "
                                    f"CUDA device(s); start at most {count} processes per node "
                                    f"(--nproc_per_node) or pass --device cpu")
    return local


def load_everything(cfg: EvalConfig, device):
    """(score_model, classifier, x, y); checkpoint problems become ConfigErrors naming the field."""
    if cfg.data == "digits":
        try:
            score_model, classifier = digits.load_digits_models(device=device, weights_dir=cfg.weights_dir)
        except Exception as e:
            raise ConfigError("weights_dir", f"cannot load the digits models from {cfg.weights_dir or 'the shipped weights'}: {e}") from None
        try:
            x, y = data.load_digits("test", n=cfg.n_images, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError("n_images", str(e).removeprefix("n_images: ")) from None
    else:
        try:
            score_model = ncsnpp.load_ncsnpp(cfg.score_ckpt, device=device)
        except Exception as e:
            raise ConfigError("score_ckpt", f"cannot load {cfg.score_ckpt!r} as the NCSN++ score model: {e}") from None
        try:
            classifier = wideresnet.load_wideresnet(cfg.classifier_ckpt, cfg.wrn_depth, cfg.wrn_widen, device=device,
                                         layout=cfg.classifier_layout, num_classes=NUM_CLASSES[cfg.data])
        except Exception as e:
            raise ConfigError("classifier_ckpt", f"cannot load {cfg.classifier_ckpt!r} as a {NUM_CLASSES[cfg.data]}-class "
                                                 f"WideResNet-{cfg.wrn_depth}-{cfg.wrn_widen}: {e}") from None
        try:
            x, y = data.load_cifar(cfg.cifar_dir, "test", n=cfg.n_images, seed=cfg.seed, dataset=cfg.data, subset=cfg.subset)
        except Exception as e:
            raise ConfigError("cifar_dir", str(e)) from None
        if cfg.n_images > x.shape[0]:
            raise ConfigError("n_images", f"the test split has {x.shape[0]} images, got {cfg.n_images}")
        for m in (score_model, classifier):
            m.to(device).eval().requires_grad_(False)
    x, y = x.to(device), y.to(device)
    check_shapes(cfg, score_model, classifier, x)
    return score_model, classifier, x, y


def check_shapes(cfg: EvalConfig, score_model, classifier, x):
    """One image through each network: the score has the image's shape, the logits one entry per class."""
    with torch.no_grad():
        probe = x[:1]
        logits = classifier(probe)
        score = score_model(probe * 2 - 1, torch.full((1,), 0.05, dtype=x.dtype, device=x.device))
    if tuple(logits.shape) != (1, NUM_CLASSES[cfg.data]):
        raise ConfigError("classifier_ckpt", f"the classifier gives logits of shape {tuple(logits.shape)} for one image; "
                                             f"{cfg.data} has {NUM_CLASSES[cfg.data]} classes")
    if tuple(score.shape) != tuple(probe.shape):
        raise ConfigError("score_ckpt", f"the score model maps an image of shape {tuple(probe.shape)} to "
                                        f"{tuple(score.shape)}")


def build_models(cfg: EvalConfig, score_model, classifier) -> tuple[dict, dict]:
    """{label: {threat: model}} and the specs they stand for (folded into the resume hash)."""
    t_star = {"Linf": cfg.t_star_linf, "L2": cfg.t_star_l2}
    models, specs = {}, {}
    for spec in cfg.defenses:
        per_threat = {}
        for threat in cfg.threats:
            d = Defense.parse(spec, t_star=t_star[threat], lam=cfg.lam, dt=cfg.dt, gradient=cfg.gradient,
                              diffusion=cfg.diffusion)
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
    for f in fields(EvalConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None, help=help)
        elif f.type == "bool":
            p.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help)
        else:
            kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=help)
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else _local_cuda_index())
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def run_eval(args) -> int:
    cfg = validate(config_from_args(args))
    device = _device(cfg)
    torch.set_num_threads(cfg.threads)
    started = _init_distributed(device)
    try:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        t0 = time.perf_counter()
        score_model, classifier, x, y = load_everything(cfg, device)
        models, specs = build_models(cfg, score_model, classifier)
        if cfg.dry_run:
            if rank == 0:
                print(dry_run(cfg, models, x, y))
            return 0
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


def dry_run(cfg: EvalConfig, models: dict, x, y) -> str:
    """The plan of the run `cfg` describes, with measured step times (coup_fast.plan): returned as text."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Two steps of the whole batch after a warm-up call, except for CIFAR-size networks on a CPU: one step
    # of two images, no warm-up (seconds per image there, the cost close to linear in the batch, and
    # first-call costs small beside it)
    small = cfg.data == "digits" or x.is_cuda
    batch = min(cfg.batch_size, x.shape[0]) if small else min(cfg.batch_size, x.shape[0], 2)
    steps = 2 if small else 1
    xb, yb = x[:batch], y[:batch]
    settings, t_star = cfg.attack_settings(), {"Linf": cfg.t_star_linf, "L2": cfg.t_star_l2}
    cifar = cfg.data != "digits"
    lines = [f"coup-fast eval --dry-run: {cfg.data}, {x.shape[0]} images of shape {tuple(x.shape[1:])} on {x.device}, "
             f"batches of {cfg.batch_size}; every checkpoint loaded strictly and the shapes agree.",
             f"Step times measured at batch {batch} over {steps} step(s){' after a warm-up' if small else ''}, "
             f"scaled linearly to the batch and by N; counts are per image and upper bounds (no image is assumed "
             f"broken early).", "",
             "| defense | threat | attack | N | purifications / img | gradients / img | this device |"
             + (" H200 (README rates) |" if cifar else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if cifar else "")]
    total = h200_total = 0.0
    measured = {}  # a step costs the same at every t*; guided (COUP) and unguided steps differ
    for label, per_threat in models.items():
        for threat in cfg.threats:
            model = per_threat[threat]
            if hasattr(model, "purify_kwargs"):
                kw = model.purify_kwargs
                gradient = kw["gradient"]
                kinds = ["purify"] + ([gradient] if any(a != "bpda-eot" for a in cfg.attacks) else [])
                guided = kw["mode"] == "coup" and kw["lam"] > 0
                for kind in kinds:
                    if (guided, kind) not in measured:
                        measured[guided, kind] = plan.measure_step_seconds(model, xb, yb, [kind], steps, small)[kind]
                seconds = {kind: measured[guided, kind] for kind in kinds}
                n_steps = ReverseGrid.from_dt(t_star[threat], cfg.dt).n_steps
            else:  # the bare classifier: one "step" is a classifier call
                gradient, n_steps = "exact", 1
                if "classifier" not in measured:
                    measured["classifier"] = _classifier_seconds(model, xb, yb)
                seconds = measured["classifier"]
            for attack in ["clean", *cfg.attacks]:
                work = plan.attack_work(attack, settings, cfg.n_eval if hasattr(model, "purify_kwargs") else 1)
                here = plan.estimate(work, x.shape[0], n_steps, seconds, gradient)
                total += here
                row = (f"| {label} | {threat} | {attack} | {n_steps} | {work.purifications:.0f} | {work.gradients:.0f} "
                       f"| {plan.hours(here)} |")
                if cifar and hasattr(model, "purify_kwargs"):
                    h200 = plan.estimate(work, x.shape[0], n_steps, plan.H200_CIFAR_STEP_SECONDS, gradient)
                    h200_total += h200
                    row += f" {plan.hours(h200)} |"
                elif cifar:  # a bare WRN-28-10 was not measured there, and costs little beside purification
                    row += " – |"
                lines.append(row)
    n_tasks = len(models) * len(cfg.threats) * (1 + len(cfg.attacks)) * -(-x.shape[0] // cfg.batch_size)
    lines += ["", f"Total on this device: {plan.hours(total)} in one process; {n_tasks} (cell, batch) tasks, dealt "
                  f"round-robin to torchrun's ranks: about {plan.hours(total / world)} with the {world} rank(s) of this "
                  f"launch, {plan.hours(total / 8)} with 8 (torchrun --nproc_per_node=8, one GPU each)."]
    if cifar:
        lines.append(f"On one H200 (README's measured rates for NCSN++ deep + WRN-28-10 at batch 64: graph engine, "
                     f"TF32; the published adjoint in torchsde fp32): {plan.hours(h200_total)}.")
    lines.append("Nothing was run: drop --dry-run to start (interrupted runs resume from --out).")
    return "\n".join(lines)


def _classifier_seconds(classifier, x, y) -> dict:
    """Seconds per image of a classifier forward ('purify') and forward + input gradient ('exact')."""
    def grad():
        xr = x.detach().clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(classifier(xr), y), xr)

    out = {}
    for kind, fn in (("purify", lambda: classifier(x)), ("exact", grad)):
        with torch.set_grad_enabled(kind == "exact"):
            fn()
            start = time.perf_counter()
            fn()
            out[kind] = (time.perf_counter() - start) / x.shape[0]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coup-fast", description="COUP purification: evaluation and paper runs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
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

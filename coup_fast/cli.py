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
from ._files import atomic_write_text
from .attacks import ATTACKS, NORMS, OWN_GRADIENT, AttackSettings, is_randomized
from .engines import CHOICES as ENGINES
from .engines import EngineChoice, choose_engine
from .evaluate import (ATTACK_GRADIENTS, DEFENSES, DIAG_ITER, LM_DEFENSES, OUTPUT_FILES, SDE_DEFENSES, Defense,
                       build_defense, evaluate, solve_steps)
from .lm import RULES as LM_RULES
from .lm import LMConfig, index_eps_model
from .models import ddpm, digits, ncsnpp, wideresnet
from .paper import check_out_dir
from .paper.cli import register as register_paper
from .protocols import PROTOCOLS
from .purify import MAX_STEPS
from .sde import DIFFUSION_SCHEDULES, ReverseGrid
from .solver import LM_MODE

DATASETS = ("digits", "cifar10", "cifar100")
SUBSETS = ("paper", "seeded")  # coup_fast.data.load_cifar's subsets: DiffPure's numpy choice, or a torch permutation
LAYOUTS = ("robustbench", "diffpure", "dm")  # coup_fast.models.wideresnet.load_wideresnet's layouts

# Defaults per data set.  Digits: sized to finish in < 10 min on 2 shared CPU cores (about 3 min): 32 seeded
# test images in one batch, dt = 0.02 (5 Euler steps over t* = 0.1 instead of the paper's 100), every purifier
# attacked with each gradient that applies to it (the worst case over them is the headline), APGD 5 iterations,
# PGD-EOT 10 x EOT 4, EOT 2 for AutoAttack 'rand', R = 10 purifications of each candidate.
# eps: the digits are 8x8 in [0, 1] with 17 grey levels (steps of 1/16); APGD-CE (20 it.) on the
# shipped bare classifier (99.3 % clean, 300 test images) leaves 98 / 92 / 60 / 16 / 1 % at L-inf eps
# 0.03 / 0.05 / 0.1 / 0.15 / 0.2, and 92 / 64 / 2 % at L2 eps 0.25 / 0.5 / 1.0.  L-inf 0.15 (about
# 2.4 grey levels) breaks the bare classifier while the digits stay legible; L2 1.0 likewise.
# CIFAR-10: the paper's protocol as its official code runs it (Sec. 5.1; DiffPure's settings): the 512
# test images np.random.RandomState(0).choice(10000, 512, replace=False), t* = 0.1 for L-inf and 0.075
# for L2, lam = 1, dt = 1e-3, full AutoAttack budgets (standard and rand, EOT 20), BPDA+EOT (PGD-20), and
# every purifier attacked with the exact gradient, the published one ('@adjoint') and, for COUP, the
# detached guidance of its code.
# CIFAR-100: Sec. 5.2.1's setting: the DDPM variant, likelihood maximization without ('lm') and with ('coup-lm')
# guidance, APGD-CE, L-inf 8/255, 100-class WideResNets, same subset rule (needs --ddpm-ckpt).
# The detached-guidance gradient is the exact one when there is no guidance (diffpure, reverse, lm): not listed.
_DIGITS_DEFENSES = ["none", "diffpure", "diffpure@adjoint", "diffpure@bpda", "reverse", "reverse@adjoint",
                    "reverse@bpda", "coup", "coup@detached-guidance", "coup@adjoint", "coup@bpda", "lm", "lm@bpda",
                    "coup-lm", "coup-lm@detached-guidance", "coup-lm@bpda"]
_PAPER_DEFENSES = ["none", "diffpure", "diffpure@adjoint", "reverse", "coup", "coup@detached-guidance",
                   "coup@adjoint"]
PRESETS = {
    "digits": dict(n_images=32, batch_size=32, eps_linf=0.15, eps_l2=1.0, t_star_linf=0.1, t_star_l2=0.1, dt=2e-2,
                   n_iter=5, eot=2, pgd_iter=10, pgd_eot=4, bpda_iter=20, bpda_eot=4, fab_iter=10,
                   square_queries=100, n_eval=10, threads=1, pgd_random_start=True, defenses=_DIGITS_DEFENSES,
                   attacks=["apgd-ce", "aa-rand", "pgd-eot"], threats=["Linf"]),
    "cifar10": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075, dt=1e-3,
                    n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                    square_queries=5000, n_eval=10, pgd_random_start=True, defenses=_PAPER_DEFENSES,
                    attacks=["aa", "apgd-ce", "bpda-eot"], threats=["Linf", "L2"]),
    "cifar100": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075,
                     dt=1e-3, n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                     square_queries=5000, n_eval=10, pgd_random_start=True,
                     defenses=["none", "lm", "lm@bpda", "coup-lm", "coup-lm@detached-guidance", "coup-lm@bpda"],
                     attacks=["apgd-ce"], threats=["Linf"]),
}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}

# Attack budgets of the literature (--protocol): coup_fast.protocols, shared with `coup-fast paper sweep`.


class ConfigError(ValueError):
    """A bad setting; the message starts with the field's name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.field = name


def _setting(default, help: str):
    """A field of EvalConfig with its --help text."""
    return field(default=default, metadata={"help": help})


def _protocols_help() -> str:
    return "; ".join(f"'{name}': {source}" for name, (source, _) in PROTOCOLS.items())


@dataclass
class EvalConfig:
    """Settings of `coup-fast eval`.  None means: the protocols' value, else the data set's preset (PRESETS)."""

    data: str = _setting("digits", f"data set and preset, one of {DATASETS}")
    protocol: list | None = _setting(None, "comma list of attack protocols of the literature, applied in order over "
                                           "the preset (flags still win): " + _protocols_help())
    n_images: int | None = _setting(None, "evaluation images (the data set's subset; digits 32, CIFAR 512)")
    subset: str = _setting("paper", f"CIFAR image subset, one of {SUBSETS}: 'paper' = DiffPure's and COUP's "
                                    "np.random.RandomState(seed).choice(10000, n, replace=False); 'seeded' = a torch "
                                    "permutation of seed")
    batch_size: int | None = _setting(None, "images per attack batch (digits 32, CIFAR 64)")
    seed: int = _setting(0, "seed of the image subset and of every batch's attack and purification noise")
    defenses: list | None = _setting(None, "comma list of defenses " + str(DEFENSES) + ", each optionally "
                                           "@gradient, the attacker's gradient " + str(ATTACK_GRADIENTS) + "; "
                                           "'@adjoint' is the published COUP / DiffPure attack (SDE defenses only); "
                                           "each defense also gets a row 'NAME: worst case', per image the worst over "
                                           "its rows' attacks x gradients")
    attacks: list | None = _setting(None, f"comma list of attacks {ATTACKS}")
    threats: list | None = _setting(None, f"comma list of threat models {NORMS}")
    eps_linf: float | None = _setting(None, "L-inf radius in [0, 1] pixel units (digits 0.15, CIFAR 8/255)")
    eps_l2: float | None = _setting(None, "L2 radius (digits 1.0, CIFAR 0.5)")
    t_star: float | None = _setting(None, "purification time t*, overriding both per-threat values below")
    t_star_linf: float | None = _setting(None, "t* under L-inf (paper: 0.1)")
    t_star_l2: float | None = _setting(None, "t* under L2 (paper: 0.075)")
    lam: float = _setting(1.0, "guidance weight lambda of COUP and COUP-LM (paper: 1)")
    dt: float | None = _setting(None, f"Euler-Maruyama step; N = t*/dt steps, at most {MAX_STEPS:,} (digits 0.02, "
                                      "CIFAR 1e-3)")
    diffusion: str = _setting("ddpm", "DiffPure's forward diffusion: 'ddpm' (its code's discrete schedule) or 'vp' "
                                      "(the continuous marginal)")
    diffpure_clamp: bool = _setting(False, "clamp DiffPure's purified image to [0, 1] before the classifier, as COUP's "
                                           "fork of its code does (default: off, the image (x + 1)/2 unclamped, as "
                                           "NVlabs' DiffPure runs it; coup, reverse, lm and coup-lm always clamp)")
    lm_steps: int = _setting(5, "lm / coup-lm: M, the likelihood-maximization steps (Chen et al. 2023: 5)")
    lm_lr: float = _setting(0.1, "lm / coup-lm: learning rate of the LM steps (Chen et al.: 0.1)")
    lm_rule: str = _setting("adam", f"lm / coup-lm: step rule, one of {LM_RULES} (Chen et al.: Adam)")
    gradient: str = _setting("exact", f"attacker gradient of defenses given without @gradient, one of {ATTACK_GRADIENTS}")
    engine: str = _setting("auto", f"purify's engine, one of {ENGINES}; 'auto': CUDA graphs on a GPU, and on a CPU "
                                   "'compile' (torch.compile'd steps, 20-90 s of compiling per batch shape first) when "
                                   "the run's calls per batch shape pay for it, else eager (said at the start); not "
                                   "in the resume hash, engines agree to round-off")
    n_iter: int | None = _setting(None, "APGD iterations, in apgd-ce and inside AutoAttack (paper: 100)")
    eot: int | None = _setting(None, "EOT draws per gradient of AutoAttack 'rand' (paper: 20)")
    apgd_eot: int = _setting(1, "EOT draws per gradient of the apgd-ce attack (AutoAttack's APGD-CE: 1)")
    n_restarts: int = _setting(1, "APGD restarts")
    n_target_classes: int = _setting(9, "target classes of APGD-T and FAB-T in AutoAttack 'standard'")
    fab_iter: int | None = _setting(None, "FAB-T iterations (AutoAttack 'standard')")
    square_queries: int | None = _setting(None, "Square queries (AutoAttack 'standard')")
    pgd_iter: int | None = _setting(None, "pgd-eot iterations")
    pgd_step: float | None = _setting(None, "pgd-eot step (default: the protocol's, scaled with eps; else 2.5 eps / "
                                            "iterations)")
    pgd_step_scale: float | None = _setting(None, "pgd-eot step relative to eps (lee-kim: 0.007 / (8/255))")
    pgd_eot: int | None = _setting(None, "pgd-eot EOT draws per gradient")
    pgd_random_start: bool | None = _setting(None, "pgd-eot starts at a random point of the ball (--no-pgd-random-start: "
                                                   "BIM, from the clean image)")
    bpda_iter: int | None = _setting(None, "bpda-eot iterations (paper: PGD-20)")
    bpda_step: float | None = _setting(None, "bpda-eot step (default 0.007 at L-inf 8/255, scaled with eps)")
    bpda_eot: int | None = _setting(None, "bpda-eot EOT draws per gradient")
    eot_chunk: int | None = _setting(None, "EOT and evaluation samples per batched purify call (default: all K at "
                                           "once, a batch of K x batch-size; lower it when that does not fit in "
                                           "memory; 1 = sequential calls)")
    n_eval: int | None = _setting(None, "R: purifications of each adversarial candidate (Avg and Worst-of-R; "
                                        "digits and CIFAR 10)")
    diagnostics: bool = _setting(True, "gradient-masking checks on the first --diag-images images (--no-diagnostics "
                                       "skips them)")
    diag_images: int = _setting(8, "images of the gradient-masking checks")
    diag_draws: int = _setting(8, "EOT draws of the gradient-consistency check")
    out: str = _setting("coup_fast_eval", "output directory: per-batch results (resume), results.json/.md/.csv, "
                                          "samples.csv (per-image verdicts)")
    device: str = _setting("auto", "torch device: cpu, cuda, cuda:i (auto: this rank's GPU if there is one, else cpu)")
    threads: int | None = _setting(None, "torch CPU threads (digits: 1, the tiny nets run fastest so on a shared "
                                         "machine; otherwise the cores divided by torchrun's local ranks)")
    cifar_dir: str | None = _setting(None, "CIFAR python-version directory or .tar.gz (coup_fast.data.load_cifar)")
    score_ckpt: str | None = _setting(None, "Score SDE NCSN++ checkpoint: checkpoint_8.pth, a {'model', 'ema'} dict "
                                            "or .safetensors (coup_fast.models.load_ncsnpp); CIFAR with an SDE defense")
    ddpm_ckpt: str | None = _setting(None, "DDPM eps-network checkpoint (Ho et al.'s layout, coup_fast.models.load_ddpm) "
                                           "of the lm / coup-lm defenses on CIFAR; digits use the shipped score model "
                                           "through coup_fast.lm.index_eps_model")
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
        """A copy with the protocols' values, then the data set's preset, filled in for every None field."""
        if not isinstance(self.data, str) or self.data not in DATASETS:
            raise ConfigError("data", f"expected one of {DATASETS}, got {self.data!r}")
        cfg = dataclasses.replace(self)
        if cfg.protocol is not None:
            _as_list(cfg, "protocol")
            unknown = [p for p in cfg.protocol if p not in PROTOCOLS]
            if unknown:
                raise ConfigError("protocol", f"unknown protocol {unknown[0]!r}; expected some of {tuple(PROTOCOLS)}")
            chosen = {}
            for name in cfg.protocol:
                chosen.update(PROTOCOLS[name][1])
            for name, value in chosen.items():
                if getattr(cfg, name) is None:
                    setattr(cfg, name, list(value) if isinstance(value, list) else value)
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

    def lm_config(self) -> LMConfig:
        return LMConfig(n_steps=self.lm_steps, lr=self.lm_lr, rule=self.lm_rule)

    def defense_names(self) -> set:
        return {str(spec).partition("@")[0] for spec in self.defenses}


_POSITIVE_INT = ("n_images", "batch_size", "n_iter", "eot", "apgd_eot", "n_restarts", "n_target_classes", "fab_iter",
                 "square_queries", "pgd_iter", "pgd_eot", "bpda_iter", "bpda_eot", "n_eval", "wrn_depth", "wrn_widen",
                 "threads", "lm_steps", "diag_images", "diag_draws", "eot_chunk")
_CHOICES = {"subset": SUBSETS, "diffusion": DIFFUSION_SCHEDULES, "gradient": ATTACK_GRADIENTS, "engine": ENGINES,
            "lm_rule": LM_RULES}
_POSITIVE_FLOAT = ("eps_linf", "eps_l2", "t_star_linf", "t_star_l2", "dt", "bpda_step", "pgd_step", "pgd_step_scale",
                   "lm_lr")
_OPTIONAL = ("pgd_step", "bpda_step", "pgd_step_scale", "eot_chunk")  # None: the attack's own default
DEVICE_TYPES = ("cpu", "cuda")


def _check_types(cfg: EvalConfig) -> None:
    """Every field has its declared type (a config file can hold anything): ConfigError naming the first that does not."""
    for f in fields(EvalConfig):
        value, kind = getattr(cfg, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("list"):
            continue  # _as_list checks lists and their items
        if kind.startswith("bool"):
            ok, what = isinstance(value, bool), "true or false"
        elif kind.startswith("int"):
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            what = "a number"
        else:
            ok, what = isinstance(value, str) and value != "", "a non-empty string"
        if not ok:
            raise ConfigError(f.name, f"expected {what}, got {value!r} ({type(value).__name__})")


def _as_list(cfg, name):
    value = getattr(cfg, name)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(name, f"expected a non-empty list, got {value!r}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ConfigError(name, f"expected a list of names, got {list(value)!r} ({bad[0]!r} is a {type(bad[0]).__name__})")
    setattr(cfg, name, list(value))


def validate(cfg: EvalConfig) -> EvalConfig:
    """Resolve protocols and presets and check every field; raise ConfigError naming the first bad one."""
    cfg = cfg.resolved()
    for name in ("defenses", "attacks", "threats"):
        _as_list(cfg, name)
    _check_types(cfg)
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
        if v is None and name in _OPTIONAL:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(name, f"expected an integer > 0, got {v!r}")
    for name in _POSITIVE_FLOAT:
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(name, f"expected a number > 0, got {v!r}")
    for name in ("t_star_linf", "t_star_l2"):
        if getattr(cfg, name) > 1:
            raise ConfigError(name, f"expected t* in (0, 1], got {getattr(cfg, name)!r}")
        if cfg.dt > getattr(cfg, name):
            raise ConfigError("dt", f"expected dt <= {name} = {getattr(cfg, name)}, got {cfg.dt!r}")
        n_steps = ReverseGrid.from_dt(getattr(cfg, name), cfg.dt).n_steps
        if n_steps > MAX_STEPS and cfg.defense_names() & set(SDE_DEFENSES):
            raise ConfigError("dt", f"{name}/dt = {getattr(cfg, name)}/{cfg.dt} means N = {n_steps:,} steps per "
                                    f"purification, above the limit of {MAX_STEPS:,}")
    if not (isinstance(cfg.lam, (int, float)) and not isinstance(cfg.lam, bool) and math.isfinite(cfg.lam)
            and cfg.lam >= 0):
        raise ConfigError("lam", f"expected a finite number >= 0, got {cfg.lam!r}")
    try:
        cfg.lm_config()
    except ValueError as e:
        raise ConfigError("lm_" + str(e).split(":")[0].replace("n_steps", "steps"), str(e).partition(": ")[2]) from None
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError("device", f"not a torch device: {cfg.device!r}") from None
        if device.type not in DEVICE_TYPES:
            raise ConfigError("device", f"{cfg.device!r}: evaluation runs on {' or '.join(DEVICE_TYPES)} (or auto)"
                              + ("; a meta tensor has no values to purify" if device.type == "meta" else ""))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{cfg.device!r}: this machine has no CUDA device (use cpu or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError("device", f"{cfg.device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    names = cfg.defense_names()
    if cfg.data != "digits":
        needed = {"cifar_dir": True, "classifier_ckpt": True, "score_ckpt": bool(names & set(SDE_DEFENSES)),
                  "ddpm_ckpt": bool(names & set(LM_DEFENSES))}
        for name, need in needed.items():
            p = getattr(cfg, name)
            if p is None and need:
                what = {"score_ckpt": " and an SDE defense (diffpure, reverse, coup)",
                        "ddpm_ckpt": " and an lm / coup-lm defense"}.get(name, "")
                raise ConfigError(name, f"required with data = {cfg.data}{what}")
            if p is not None and not need:
                raise ConfigError(name, f"unused: no defense of {sorted(names)} needs it")
            if p is not None and not os.path.exists(p):
                raise ConfigError(name, f"no such file or directory: {p!r}")
        if cfg.weights_dir is not None:
            raise ConfigError("weights_dir", f"only used with data = digits (data is {cfg.data!r})")
    else:
        if cfg.weights_dir is not None and not os.path.isdir(cfg.weights_dir):
            raise ConfigError("weights_dir", f"no such directory: {cfg.weights_dir!r}")
        for name in ("cifar_dir", "score_ckpt", "ddpm_ckpt", "classifier_ckpt", "classifier_layout"):
            if getattr(cfg, name) is not None:
                raise ConfigError(name, f"only used with CIFAR data (data is {cfg.data!r})")
    return cfg


def check_out(cfg: EvalConfig, create: bool) -> None:
    """--out must be a directory we can write, checked before any work.  create=False (first, before anything is
    loaded; and for a dry run, which writes nothing): the path is not taken by a file and its nearest existing
    folder is writable.  create=True (after loading, before computing): coup_fast.paper.check_out_dir creates it and
    writes a probe file, which also catches a read-only file system where root passes os.access."""
    files = (*OUTPUT_FILES, "config.json")
    try:
        if create:
            check_out_dir(cfg.out, files, arg="out")
            return
        if os.path.lexists(cfg.out) and not os.path.isdir(cfg.out):
            raise ValueError(f"out {cfg.out!r}: exists and is not a directory")
        parent = os.path.abspath(cfg.out)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"out {cfg.out!r}: {parent!r} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"out {cfg.out!r}: {parent!r} is not writable")
    except ValueError as e:
        raise ConfigError("out", str(e).removeprefix("out ")) from None


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
    """(score_model, eps_model, classifier, x, y); checkpoint problems become ConfigErrors naming the field.

    score_model: the SDE defenses' score (None when none is evaluated on CIFAR); eps_model: the LM defenses'
    eps-network on the DDPM index (digits: the shipped score model through coup_fast.lm.index_eps_model)."""
    names = cfg.defense_names()
    score_model = eps_model = None
    if cfg.data == "digits":
        try:
            score_model, classifier = digits.load_digits_models(device=device, weights_dir=cfg.weights_dir)
        except Exception as e:
            raise ConfigError("weights_dir", f"cannot load the digits models from {cfg.weights_dir or 'the shipped weights'}: {e}") from None
        eps_model = index_eps_model(score_model)
        try:
            x, y = data.load_digits("test", n=cfg.n_images, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError("n_images", str(e).removeprefix("n_images: ")) from None
    else:
        if names & set(SDE_DEFENSES):
            try:
                score_model = ncsnpp.load_ncsnpp(cfg.score_ckpt, device=device)
            except Exception as e:
                raise ConfigError("score_ckpt", f"cannot load {cfg.score_ckpt!r} as the NCSN++ score model: {e}") from None
        if names & set(LM_DEFENSES):
            try:
                eps_model = ddpm.load_ddpm(cfg.ddpm_ckpt, device=device)
            except Exception as e:
                raise ConfigError("ddpm_ckpt", f"cannot load {cfg.ddpm_ckpt!r} as the DDPM U-Net: {e}") from None
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
        for m in (score_model, eps_model, classifier):
            if m is not None:
                m.to(device).eval().requires_grad_(False)
    x, y = x.to(device), y.to(device)
    check_shapes(cfg, score_model, eps_model, classifier, x)
    return score_model, eps_model, classifier, x, y


def check_shapes(cfg: EvalConfig, score_model, eps_model, classifier, x):
    """One image through each network: the score and eps have the image's shape, the logits one entry per class."""
    with torch.no_grad():
        probe = x[:1]
        logits = classifier(probe)
        score = None if score_model is None else score_model(probe * 2 - 1, torch.full((1,), 0.05, dtype=x.dtype,
                                                                                        device=x.device))
        eps = None if eps_model is None else eps_model(probe * 2 - 1, torch.full((1,), 100, device=x.device))
    if tuple(logits.shape) != (1, NUM_CLASSES[cfg.data]):
        raise ConfigError("classifier_ckpt", f"the classifier gives logits of shape {tuple(logits.shape)} for one image; "
                                             f"{cfg.data} has {NUM_CLASSES[cfg.data]} classes")
    if score is not None and tuple(score.shape) != tuple(probe.shape):
        raise ConfigError("score_ckpt", f"the score model maps an image of shape {tuple(probe.shape)} to "
                                        f"{tuple(score.shape)}")
    if eps is not None and tuple(eps.shape) != tuple(probe.shape):
        raise ConfigError("ddpm_ckpt", f"the eps-network maps an image of shape {tuple(probe.shape)} to "
                                       f"{tuple(eps.shape)}")


def build_models(cfg: EvalConfig, score_model, classifier, eps_model=None, sde_engine: str | None = None
                 ) -> tuple[dict, dict]:
    """{label: {threat: model}} and the specs they stand for (folded into the resume hash).  sde_engine: the
    engine of the SDE defenses when it is not cfg.engine (`choose_eval_engine`; LM runs eagerly anyway)."""
    t_star = {"Linf": cfg.t_star_linf, "L2": cfg.t_star_l2}
    models, specs = {}, {}
    for spec in cfg.defenses:
        per_threat = {}
        for threat in cfg.threats:
            d = Defense.parse(spec, t_star=t_star[threat], lam=cfg.lam, dt=cfg.dt, gradient=cfg.gradient,
                              diffusion=cfg.diffusion, lm=cfg.lm_config())
            if d.name == "diffpure":  # clamped or not (NVlabs' default); the other defenses clamp as their code does
                d = dataclasses.replace(d, clamp=cfg.diffpure_clamp)
            engine = sde_engine if sde_engine is not None and d.name in SDE_DEFENSES else cfg.engine
            per_threat[threat] = build_defense(d, score_model, classifier, engine=engine, eps_model=eps_model)
            # What each model depends on: the bare classifier on nothing of these, LM not on t*, dt, diffusion;
            # clamp only where set (diffpure), so the other rows keep their resume folders.
            if d.name == "none":
                what = {"name": "none"}
            elif d.name in LM_DEFENSES:
                unused = ("t_star", "dt", "diffusion", "clamp")
                what = {k: v for k, v in dataclasses.asdict(d).items() if k not in unused}
                what["lam"] = d.lam if d.name == "coup-lm" else 0.0
            else:
                what = {k: v for k, v in dataclasses.asdict(d).items() if k != "lm" and (k != "clamp" or v is not None)}
            specs.setdefault(d.label, {})[threat] = what
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
        if f.name in ("progress", "diagnostics"):  # on by default: the flag turns it off
            p.add_argument(f"--no-{f.name}", dest=f.name, action="store_const", const=False, default=None, help=help)
        elif f.type == "bool":
            p.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help)
        elif f.type == "bool | None":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
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


def choose_eval_engine(cfg: EvalConfig, models: dict, x, y) -> EngineChoice | None:
    """engine 'auto' on a CPU: the engine the SDE defenses should run (engines.choose_engine), from how often the
    run calls each batch shape (the plan's upper-bound counts) and one measured step of an exact gradient; None
    where there is nothing to choose (an explicit --engine, CUDA, no SDE defense)."""
    if cfg.engine != "auto" or x.device.type != "cpu":
        return None
    settings, n_batches = cfg.attack_settings(), -(-x.shape[0] // cfg.batch_size)
    calls = draws = 0.0  # batched calls, and the draws they run (a batched EOT call of K draws costs K rows)
    probe = None
    for label, per_threat in models.items():
        for model in per_threat.values():
            kw = getattr(model, "purify_kwargs", None)
            if kw is None or kw["mode"] == LM_MODE or kw["gradient"] == "adjoint":  # these never compile
                continue
            probe = model if probe is None else probe
            randomized = is_randomized(model)
            for attack in ["clean", *cfg.attacks]:
                work = plan.attack_work(attack, settings, cfg.n_eval, randomized)
                calls += n_batches * sum(count / samples for (_, samples), count in work.calls)
                draws += n_batches * plan.solver_steps(model) * sum(count for _, count in work.calls)
    if probe is None or not calls:
        return None
    batch = min(cfg.batch_size, x.shape[0]) if cfg.data == "digits" else min(cfg.batch_size, x.shape[0], 2)
    per_row_step = plan.measure_step_seconds(probe, x[:batch], y[:batch], ["exact"], steps=1,
                                             warmup=cfg.data == "digits")["exact"]
    seconds_per_call = per_row_step * min(cfg.batch_size, x.shape[0]) * draws / calls  # the mean call
    return choose_engine(x.device, int(calls), seconds_per_call)


def run_eval(args) -> int:
    cfg = validate(config_from_args(args))
    check_out(cfg, create=False)  # before any work: a run whose results cannot be saved is not worth starting
    device = _device(cfg)
    torch.set_num_threads(cfg.threads)
    started = _init_distributed(device)
    try:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        t0 = time.perf_counter()
        score_model, eps_model, classifier, x, y = load_everything(cfg, device)
        models, specs = build_models(cfg, score_model, classifier, eps_model)
        choice = choose_eval_engine(cfg, models, x, y)
        if rank == 0 and choice is not None and (cfg.progress or cfg.dry_run):
            print(f"coup-fast eval: {choice.reason}" + ("; the dry run prices the eager engine (an upper bound)"
                                                         if cfg.dry_run and choice.compiles else ""), file=sys.stderr)
        if choice is not None and choice.engine != "eager" and not cfg.dry_run:  # engine 'auto' is eager on a CPU
            models, specs = build_models(cfg, score_model, classifier, eps_model, sde_engine=choice.engine)
        if cfg.dry_run:
            if rank == 0:
                print(dry_run(cfg, models, x, y))
            return 0
        check_out(cfg, create=True)
        if rank == 0 and cfg.progress:
            steps = {label: solve_steps(per_threat[t]) for label, per_threat in models.items() for t in cfg.threats}
            print(f"coup-fast eval: {cfg.data}, n = {x.shape[0]} images, R = {cfg.n_eval}, {len(models)} defense rows x "
                  f"{1 + len(cfg.attacks)} columns x {len(cfg.threats)} threat(s); "
                  + ", ".join(f"{label}: {n}" for label, n in steps.items() if n), file=sys.stderr)
        eps = {"Linf": cfg.eps_linf, "L2": cfg.eps_l2}
        table = evaluate(models, x, y, attacks=cfg.attacks, threats=cfg.threats, eps=eps,
                         settings=cfg.attack_settings(), n_eval=cfg.n_eval, batch_size=cfg.batch_size,
                         seed=cfg.seed, out_dir=cfg.out, tag={"data": cfg.data}, specs=specs,
                         progress=cfg.progress, diagnostics=cfg.diagnostics, diag_images=cfg.diag_images,
                         diag_draws=cfg.diag_draws)
        if rank == 0:
            wall = time.perf_counter() - t0
            print()
            print(table.to_markdown())
            print(f"\n{cfg.data}: n = {x.shape[0]}, defense rows {len(models)}, attacks {len(cfg.attacks)}, "
                  f"threats {len(cfg.threats)}, R = {cfg.n_eval}; wall {wall:.0f} s; results in "
                  f"{os.path.join(cfg.out, 'results.{json,md,csv}')}, per-image verdicts in "
                  f"{os.path.join(cfg.out, 'samples.csv')}")
            for line in table.warnings():
                print(f"warning: gradient-masking check fired: {line}", file=sys.stderr)
            atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0


def dry_run(cfg: EvalConfig, models: dict, x, y) -> str:
    """The plan of the run `cfg` describes, with measured step times (coup_fast.plan): returned as text."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A few steps of the whole batch after a warm-up call, at each batch the run uses (B x EOT draws, B x R), except
    # for CIFAR-size networks on a CPU: one step of two images, no warm-up, scaled linearly (seconds per image there,
    # the cost close to linear in the batch, and first-call costs small beside it)
    small = cfg.data == "digits" or x.is_cuda
    batch = min(cfg.batch_size, x.shape[0]) if small else min(cfg.batch_size, x.shape[0], 2)
    steps = 2 if small else 1
    xb, yb = x[:batch], y[:batch]
    settings, cifar = cfg.attack_settings(), cfg.data != "digits"
    lines = [f"coup-fast eval --dry-run: {cfg.data}, {x.shape[0]} images of shape {tuple(x.shape[1:])} on {x.device}, "
             f"batches of {cfg.batch_size}, R = {cfg.n_eval}; every checkpoint loaded strictly and the shapes agree.",
             f"Step times measured at {batch} image(s) x the draws per batched call, over {steps} step(s)"
             f"{' after a warm-up' if small else ', scaled linearly in the batch'}, then scaled by N; counts are per "
             f"image and upper bounds (no image is assumed broken early), EOT draws and R evaluations counted one by one.",
             "", "| defense | threat | attack | N | purifications / img | gradients / img | this device |"
             + (" H200 (README rates) |" if cifar else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if cifar else "")]
    total = h200_total = 0.0
    measured = {}  # a step costs the same at every t*; guided and unguided steps differ, and LM from SDE steps
    groups = {label: label.partition("@")[0] for label in models}
    first = {}
    for label in models:
        first.setdefault(groups[label], label)

    def seconds_for(model):
        purified = hasattr(model, "purify_kwargs")
        if purified:
            kw = model.purify_kwargs
            key = (kw["mode"] == LM_MODE, kw["mode"] in ("coup", LM_MODE) and kw["lam"] > 0)
        else:
            key = ("classifier",)

        def lookup(kind, samples):
            samples = samples if small else 1
            if (key, kind, samples) not in measured:
                if purified:
                    measured[key, kind, samples] = plan.measure_step_seconds(model, xb, yb, [kind], steps, small,
                                                                             samples)[kind]
                else:
                    measured[key, kind, samples] = _classifier_seconds(model, xb, yb, kind, samples)
            return measured[key, kind, samples]
        return lookup

    def add_row(label, threat, what, work, n_images, model):
        nonlocal total, h200_total
        purified = hasattr(model, "purify_kwargs")
        gradient = model.purify_kwargs["gradient"] if purified else "exact"
        n_steps = plan.solver_steps(model) if purified else 1
        here = plan.estimate(work, n_images, n_steps, seconds_for(model), gradient)
        total += here
        row = (f"| {label} | {threat} | {what} | {n_steps} | {work.purifications:.0f} | {work.gradients:.0f} "
               f"| {plan.hours(here)} |")
        if cifar and purified and model.purify_kwargs["mode"] != LM_MODE:
            h200 = plan.estimate(work, n_images, n_steps, plan.H200_CIFAR_STEP_SECONDS, gradient)
            h200_total += h200
            row += f" {plan.hours(h200)} |"
        elif cifar:  # a bare WRN-28-10 (little beside purification) and the DDPM's LM steps were not measured there
            row += " – |"
        lines.append(row)

    n_tasks = 0
    n_batches = -(-x.shape[0] // cfg.batch_size)
    n_diag = min(cfg.diag_images, x.shape[0])
    for label, per_threat in models.items():
        for threat in cfg.threats:
            model = per_threat[threat]
            randomized = is_randomized(model)
            for attack in ["clean", *cfg.attacks]:
                if (attack == "clean" or attack in OWN_GRADIENT) and first[groups[label]] != label:
                    lines.append(f"| {label} | {threat} | {attack} | | | | shared with {first[groups[label]]} |"
                                 + (" |" if cifar else ""))
                    continue
                n_tasks += n_batches
                add_row(label, threat, attack, plan.attack_work(attack, settings, cfg.n_eval, randomized),
                        x.shape[0], model)
            if cfg.diagnostics:
                checks = ["large-eps"] + (["consistency"] if randomized and first[groups[label]] == label else [])
                for check in checks:
                    n_tasks += 1
                    work = plan.diagnostics_work(check, settings, cfg.n_eval, cfg.diag_draws, DIAG_ITER, randomized)
                    add_row(label, threat, f"check {check} ({n_diag} images)", work, n_diag, model)
    lines += ["", f"Total on this device: {plan.hours(total)} in one process; {n_tasks} tasks, dealt round-robin to "
                  f"torchrun's ranks: about {plan.hours(total / world)} with the {world} rank(s) of this launch, "
                  f"{plan.hours(total / 8)} with 8 (torchrun --nproc_per_node=8, one GPU each)."]
    if cifar:
        lines.append(f"On one H200 (README's measured rates for NCSN++ deep + WRN-28-10 at batch 64: graph engine, "
                     f"TF32; the published adjoint in torchsde fp32): {plan.hours(h200_total)}.")
    lines.append("Nothing was run: drop --dry-run to start (interrupted runs resume from --out).")
    return "\n".join(lines)


def _classifier_seconds(classifier, x, y, kind: str, samples: int = 1) -> float:
    """Seconds per image row of a classifier forward ('purify') or forward + input gradient (any other kind), at
    batch x.shape[0] x samples."""
    xs = x.repeat(samples, *[1] * (x.ndim - 1))
    ys = y.repeat(samples)

    def run():
        if kind == "purify":
            with torch.no_grad():
                classifier(xs)
            return
        xr = xs.detach().clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(classifier(xr), ys), xr)

    run()
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / xs.shape[0]


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

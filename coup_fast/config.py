"""Settings of `coup-fast eval`: the presets per data set, the literature's protocols, and their validation.

Every setting is a field of `EvalConfig`; a config file (TOML or YAML) uses the same names (dashes or underscores).
`validate` resolves protocols and presets and checks every field before any work; a bad one is a `ConfigError`
naming the flag (`--cifar-dir`), with what was expected.  coup_fast.cli turns the fields into flags.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields

import torch

from .attacks import ATTACKS, LOSSES, NORMS, AttackSettings
from .engines import CHOICES as ENGINES
from .evaluate import ATTACK_GRADIENTS, DEFENSES, LM_DEFENSES, OUTPUT_FILES, SDE_DEFENSES, Defense
from .lm import RULES as LM_RULES
from .lm import LMConfig
from .paper import check_out_dir
from .protocols import PROTOCOLS
from .purify import MAX_STEPS
from .schedule import SCHEDULES
from .sde import DIFFUSION_SCHEDULES, ReverseGrid, ddpm_index

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
                   diffattack_iter=5, diffattack_eot=4, diffhammer_iter=5, diffhammer_n=10, loss="ce",
                   attacks=["apgd-ce", "aa-rand", "pgd-eot"], threats=["Linf"]),
    "cifar10": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075, dt=1e-3,
                    n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                    square_queries=5000, n_eval=10, pgd_random_start=True, defenses=_PAPER_DEFENSES,
                    diffattack_iter=100, diffattack_eot=20, diffhammer_iter=50, diffhammer_n=10, loss="ce",
                    attacks=["aa", "apgd-ce", "bpda-eot"], threats=["Linf", "L2"]),
    "cifar100": dict(n_images=512, batch_size=64, eps_linf=8 / 255, eps_l2=0.5, t_star_linf=0.1, t_star_l2=0.075,
                     dt=1e-3, n_iter=100, eot=20, pgd_iter=20, pgd_eot=20, bpda_iter=20, bpda_eot=20, fab_iter=100,
                     square_queries=5000, n_eval=10, pgd_random_start=True, diffattack_iter=100, diffattack_eot=20,
                     diffhammer_iter=50, diffhammer_n=10, loss="ce",
                     defenses=["none", "lm", "lm@bpda", "coup-lm", "coup-lm@detached-guidance", "coup-lm@bpda"],
                     attacks=["apgd-ce"], threats=["Linf"]),
}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}

# Attack budgets of the literature (--protocol): coup_fast.protocols, shared with `coup-fast paper sweep`.


def flag(name: str) -> str:
    """The command-line flag of a field: n_images -> --n-images."""
    return "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """A bad setting; the message starts with the flag that sets it (--cifar-dir, not cifar_dir)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{flag(name)}: {message}")
        self.field = name


def _setting(default, help: str):
    """A field of EvalConfig with its --help text (coup_fast.cli adds the default)."""
    return field(default=default, metadata={"help": help})


def _protocols_help() -> str:
    return "; ".join(f"'{name}': {source}" for name, (source, _) in PROTOCOLS.items())


DEFAULT_OUT = "coup_fast_eval"
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1      # numpy's RandomState (the paper's CIFAR subset) takes seeds below 2^32
MAX_LM_STEPS = 10_000     # LM optimizer steps per purification (Chen et al.: 5)
MAX_WRN_DEPTH = 202       # as `coup-fast paper`; WideResNets deeper than this are not in the literature
MAX_WRN_WIDEN = 32
MAX_IMAGES = 1_000_000


@dataclass
class EvalConfig:
    """Settings of `coup-fast eval`.  None means: the protocols' value, else the data set's preset (PRESETS)."""

    data: str = _setting("digits", f"data set and preset, one of {DATASETS}")
    protocol: list | None = _setting(None, "comma list of attack protocols of the literature, applied in order over "
                                           "the preset (flags still win): " + _protocols_help())
    n_images: int | None = _setting(None, "evaluation images (the data set's subset)")
    subset: str = _setting("paper", f"CIFAR image subset, one of {SUBSETS}: 'paper' = DiffPure's and COUP's "
                                    "np.random.RandomState(seed).choice(10000, n, replace=False); 'seeded' = a torch "
                                    "permutation of seed")
    batch_size: int | None = _setting(None, "images per attack batch")
    seed: int = _setting(0, f"seed in [0, {MAX_SEED}] of the image subset and of every batch's attack and purification "
                            "noise")
    defenses: list | None = _setting(None, "comma list of defenses " + str(DEFENSES) + ", each optionally "
                                           "@gradient, the attacker's gradient " + str(ATTACK_GRADIENTS) + "; "
                                           "'@adjoint' is the published COUP / DiffPure attack (SDE defenses only); "
                                           "each defense also gets a row 'NAME: worst case', per image the worst over "
                                           "its rows' attacks x gradients")
    attacks: list | None = _setting(None, f"comma list of attacks {ATTACKS}")
    threats: list | None = _setting(None, f"comma list of threat models {NORMS}")
    schedule: str = _setting("cascade", f"one of {SCHEDULES}: 'cascade' attacks, at each row x attack, only the images "
                                        "still robust under Worst-of-R (the worst case's Worst-of-R stays exact, its "
                                        "Avg and MV become upper bounds, per-row cells cover those images); 'full' "
                                        "attacks every image with everything (complete per-row tables)")
    pilot: int | None = _setting(None, "run the real schedule on the batches holding the first K images, measure the "
                                       "survival after each stage and the time per call, price the full run from them "
                                       "and exit (its records are kept: the real run resumes from them)")
    eps_linf: float | None = _setting(None, "L-inf radius in [0, 1] pixel units")
    eps_l2: float | None = _setting(None, "L2 radius in [0, 1] pixel units, at most the image box's diagonal")
    t_star: float | None = _setting(None, "purification time t*, overriding both per-threat values below")
    t_star_linf: float | None = _setting(None, "t* under L-inf (paper: 0.1)")
    t_star_l2: float | None = _setting(None, "t* under L2 (paper: 0.075)")
    lam: float = _setting(1.0, "guidance weight lambda of COUP and COUP-LM (paper: 1)")
    dt: float | None = _setting(None, f"Euler-Maruyama step of the SDE defenses; N = t*/dt steps, at most "
                                      f"{MAX_STEPS:,} (paper: 1e-3; unused by lm / coup-lm)")
    diffusion: str = _setting("ddpm", "DiffPure's forward diffusion: 'ddpm' (its code's discrete schedule; t* on its "
                                      "1/1000 grid) or 'vp' (the continuous marginal)")
    diffpure_clamp: bool = _setting(False, "clamp DiffPure's purified image to [0, 1] before the classifier, as COUP's "
                                           "fork of its code does (off: the image (x + 1)/2 unclamped, as NVlabs' "
                                           "DiffPure runs it; coup, reverse, lm and coup-lm always clamp)")
    lm_steps: int = _setting(5, f"lm / coup-lm: M, the likelihood-maximization steps, at most {MAX_LM_STEPS:,} (Chen "
                                "et al. 2023: 5)")
    lm_lr: float = _setting(0.1, "lm / coup-lm: learning rate of the LM steps (Chen et al.: 0.1)")
    lm_rule: str = _setting("adam", f"lm / coup-lm: step rule, one of {LM_RULES} (Chen et al.: Adam)")
    gradient: str = _setting("exact", f"attacker gradient of defenses given without @gradient, one of {ATTACK_GRADIENTS}")
    engine: str = _setting("auto", f"purify's engine, one of {ENGINES}; 'auto': CUDA graphs on a GPU, and on a CPU "
                                   "'compile' (torch.compile'd steps, 20-90 s of compiling per batch shape first) when "
                                   "the run's calls per batch shape pay for it, else eager (said at the start); "
                                   "'torchsde': the published attack's rows (@adjoint) through torchsde, the reference, "
                                   "the other rows as 'auto'; not in the resume hash, engines agree to round-off")
    n_iter: int | None = _setting(None, "APGD iterations, in apgd-ce and inside AutoAttack (paper: 100)")
    eot: int | None = _setting(None, "EOT draws per gradient of AutoAttack 'rand' (paper: 20)")
    apgd_eot: int = _setting(1, "EOT draws per gradient of the apgd-ce attack (AutoAttack's APGD-CE: 1)")
    n_restarts: int = _setting(1, "APGD restarts")
    n_target_classes: int = _setting(9, "target classes of APGD-T and FAB-T in AutoAttack 'standard'")
    fab_iter: int | None = _setting(None, "FAB-T iterations (AutoAttack 'standard'; paper: 100)")
    square_queries: int | None = _setting(None, "Square queries (AutoAttack 'standard'; paper: 5000)")
    pgd_iter: int | None = _setting(None, "pgd-eot iterations")
    pgd_step: float | None = _setting(None, "pgd-eot step (unset: the protocol's, scaled with eps; else 2.5 eps / "
                                            "iterations)")
    pgd_step_scale: float | None = _setting(None, "pgd-eot step relative to eps (lee-kim: 0.007 / (8/255))")
    pgd_eot: int | None = _setting(None, "pgd-eot EOT draws per gradient")
    pgd_random_start: bool | None = _setting(None, "pgd-eot starts at a random point of the ball (--no-pgd-random-start: "
                                                   "BIM, from the clean image)")
    bpda_iter: int | None = _setting(None, "bpda-eot iterations (paper: PGD-20)")
    bpda_step: float | None = _setting(None, "bpda-eot step (unset: 0.007 at L-inf 8/255, scaled with eps)")
    bpda_eot: int | None = _setting(None, "bpda-eot EOT draws per gradient")
    # issue 25: the loss of the PGD attacks, and DiffAttack's and DiffHammer's settings (coup_fast.attacks.registry)
    loss: str | None = _setting(None, f"loss pgd-eot and bpda-eot ascend, one of {LOSSES}: 'margin' is Carlini & "
                                      "Wagner's max_(j != y) z_j - z_y (S&P 2017), 'dlr' Croce & Hein's difference of "
                                      "logits ratio (ICML 2020, AutoAttack's APGD-DLR)")
    diffattack_iter: int | None = _setting(None, "diffattack: APGD iterations per round, CE then DLR (Kang et al., "
                                                 "'DiffAttack', NeurIPS 2023, App. D.2: 100)")
    diffattack_eot: int | None = _setting(None, "diffattack: EOT draws per gradient (DiffAttack App. D.2: 20)")
    diffattack_lambda: float = _setting(1.0, "diffattack: weight of the deviated-reconstruction loss over the reverse "
                                             "states (DiffAttack App. D.2: 1)")
    diffattack_steps: int | None = _setting(None, "diffattack: reverse states carrying the deviated-reconstruction "
                                                  "loss, evenly spaced (unset: all N; DiffAttack Sec. 4.7: uniform "
                                                  "steps)")
    diffhammer_iter: int | None = _setting(None, "diffhammer: APGD iterations per restart (Wang et al., 'DiffHammer', "
                                                 "NeurIPS 2024, App. C.1.2: 3 x 50)")
    diffhammer_restarts: int = _setting(3, "diffhammer: restarts, ascending the margin, CE and DLR losses in turn "
                                           "(DiffHammer App. C.1.2 and its code)")
    diffhammer_n: int | None = _setting(None, "diffhammer: N purification paths per iteration for the EM and the "
                                              "in-loop evaluation (DiffHammer Sec. 4.5: 10)")
    diffhammer_alpha: float = _setting(0.5, "diffhammer: stepwise-EM exponent, g_t = t^-a g + (1 - t^-a) g_(t-1) "
                                            "(DiffHammer Sec. 4.5)")
    diffhammer_em_lam: float = _setting(5.0, "diffhammer: E-step sharpness, q = sigmoid(lam z) (DiffHammer's code, "
                                             "EM_LAM)")
    eot_chunk: int | None = _setting(None, "EOT and evaluation samples per batched purify call (unset: all K at once, a "
                                           "batch of K x batch-size rows; lower it when that does not fit in memory; "
                                           "1 = sequential calls)")
    n_eval: int | None = _setting(None, "R: purifications of each adversarial candidate (Avg, MV and Worst-of-R)")
    diagnostics: bool = _setting(True, "skip the gradient-masking checks (by default they run on the first "
                                       "--diag-images images)")
    diag_images: int = _setting(8, "images of the gradient-masking checks (under --schedule cascade every row x attack "
                                   "attacks them, so the surrogate check compares rows on them)")
    diag_draws: int = _setting(8, "EOT draws of the gradient-consistency check")
    out: str = _setting(DEFAULT_OUT, "output directory (relative to the working directory): per-batch records "
                                     "(resume), results.json/.md/.csv, samples.csv (per-image verdicts); one run at a "
                                     "time holds it")
    device: str = _setting("auto", "torch device: cpu, cuda, cuda:i (auto: this rank's GPU if there is one, else cpu)")
    threads: int | None = _setting(None, f"torch CPU threads, at most {MAX_THREADS} (unset on CIFAR: the cores divided "
                                         "by torchrun's local ranks; the tiny digits nets run fastest on one)")
    cifar_dir: str | None = _setting(None, "CIFAR python-version directory or .tar.gz (coup_fast.data.load_cifar)")
    score_ckpt: str | None = _setting(None, "Score SDE NCSN++ checkpoint: checkpoint_8.pth, a {'model', 'ema'} dict "
                                            "or .safetensors (coup_fast.models.load_ncsnpp); CIFAR with an SDE defense")
    ddpm_ckpt: str | None = _setting(None, "DDPM eps-network checkpoint (Ho et al.'s layout, coup_fast.models.load_ddpm) "
                                           "of the lm / coup-lm defenses on CIFAR; digits use the shipped score model "
                                           "through coup_fast.lm.index_eps_model")
    classifier_ckpt: str | None = _setting(None, "WideResNet checkpoint (coup_fast.models.load_wideresnet)")
    classifier_layout: str | None = _setting(None, f"the checkpoint's WideResNet layout, one of {LAYOUTS} (unset: "
                                                   "detected from its keys; see load_wideresnet)")
    weights_dir: str | None = _setting(None, "digits: directory of the digits weights (unset: the shipped ones)")
    wrn_depth: int = _setting(28, f"WideResNet depth, 6k + 4 up to {MAX_WRN_DEPTH} (28, or 70 for WRN-70-16)")
    wrn_widen: int = _setting(10, f"WideResNet widen factor, at most {MAX_WRN_WIDEN} (10, or 16 for WRN-70-16)")
    dry_run: bool = _setting(False, "validate every file and setting, measure a few steps, print the plan "
                                    "(purifications and gradients per attack, upper-bound time, sharding) and exit")
    progress: bool = _setting(True, "no progress bars (by default they are shown)")

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
                 "threads", "lm_steps", "diag_images", "diag_draws", "eot_chunk", "pilot", "diffattack_iter",
                 "diffattack_eot", "diffhammer_iter", "diffhammer_restarts", "diffhammer_n", "diffattack_steps")
_AT_MOST = {"threads": MAX_THREADS, "lm_steps": MAX_LM_STEPS, "wrn_depth": MAX_WRN_DEPTH, "wrn_widen": MAX_WRN_WIDEN,
            "n_images": MAX_IMAGES}
_CHOICES = {"subset": SUBSETS, "diffusion": DIFFUSION_SCHEDULES, "gradient": ATTACK_GRADIENTS, "engine": ENGINES,
            "lm_rule": LM_RULES, "schedule": SCHEDULES, "loss": LOSSES}
_POSITIVE_FLOAT = ("eps_linf", "eps_l2", "t_star_linf", "t_star_l2", "dt", "bpda_step", "pgd_step", "pgd_step_scale",
                   "lm_lr")
_OPTIONAL = ("pgd_step", "bpda_step", "pgd_step_scale", "eot_chunk", "pilot", "diffattack_steps")  # None: the attack's own default, or off
IMAGE_NUMEL = {"digits": 64, "cifar10": 3 * 32 * 32, "cifar100": 3 * 32 * 32}  # pixels of one image (eps_l2's bound)
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
    for name in ("attacks", "threats", "protocol"):
        values = getattr(cfg, name) or []
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(name, f"listed twice: {', '.join(twice)}")
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
        if v > _AT_MOST.get(name, v):
            raise ConfigError(name, f"expected an integer in [1, {_AT_MOST[name]:,}], got {v!r}")
    if isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError("seed", f"expected an integer in [0, {MAX_SEED}] (numpy's RandomState draws the paper's "
                                  f"CIFAR subset from it), got {cfg.seed!r}")
    if (cfg.wrn_depth - 4) % 6:
        raise ConfigError("wrn_depth", f"a WideResNet has depth 6k + 4 (28, 34, 70, ...), got {cfg.wrn_depth}")
    if cfg.pilot is not None and cfg.pilot > cfg.n_images:
        raise ConfigError("pilot", f"expected at most --n-images = {cfg.n_images} images, got {cfg.pilot}")
    if cfg.pilot is not None and cfg.dry_run:
        raise ConfigError("pilot", "--dry-run prices the upper bound without running anything; --pilot runs the "
                                   "first images to price from measurements: pass one of them")
    for name in _POSITIVE_FLOAT:
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(name, f"expected a number > 0, got {v!r}")
    if cfg.eps_linf > 1:
        raise ConfigError("eps_linf", f"expected a radius in (0, 1]: images are in [0, 1], so 1 already allows every "
                                      f"image; got {cfg.eps_linf!r}")
    diagonal = math.sqrt(IMAGE_NUMEL[cfg.data])
    if cfg.eps_l2 > diagonal:
        raise ConfigError("eps_l2", f"expected a radius in (0, {diagonal:.4g}], the diagonal of the {cfg.data} image "
                                    f"box (larger allows nothing more); got {cfg.eps_l2!r}")
    sde = bool(cfg.defense_names() & set(SDE_DEFENSES))
    for name in ("t_star_linf", "t_star_l2"):
        if getattr(cfg, name) > 1:
            raise ConfigError(name, f"expected t* in (0, 1], got {getattr(cfg, name)!r}")
        if not sde:
            continue  # t* and dt only matter to the SDE defenses (lm / coup-lm run M optimizer steps)
        if cfg.dt > getattr(cfg, name):
            raise ConfigError("dt", f"expected dt <= {name} = {getattr(cfg, name)}, got {cfg.dt!r}")
        n_steps = ReverseGrid.from_dt(getattr(cfg, name), cfg.dt).n_steps
        if n_steps > MAX_STEPS:
            raise ConfigError("dt", f"{name}/dt = {getattr(cfg, name)}/{cfg.dt} means N = {n_steps:,} steps per "
                                    f"purification, above the limit of {MAX_STEPS:,}")
        if "diffpure" in cfg.defense_names() and cfg.diffusion == "ddpm":
            try:
                ddpm_index(float(getattr(cfg, name)))
            except ValueError as e:
                raise ConfigError("t_star" if cfg.t_star is not None else name,
                                  f"{str(e).partition(': ')[2]}; on the command line: --diffusion vp") from None
    if not (isinstance(cfg.lam, (int, float)) and not isinstance(cfg.lam, bool) and math.isfinite(cfg.lam)
            and cfg.lam >= 0):
        raise ConfigError("lam", f"expected a finite number >= 0, got {cfg.lam!r}")
    try:
        cfg.attack_settings()
    except ValueError as e:  # AttackSettings checks its fields, naming them
        name = str(e).split(":")[0].strip().lstrip("-").replace("-", "_")
        raise ConfigError(name if hasattr(cfg, name) else "config", str(e).partition(": ")[2] or str(e)) from None
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


_MAX_CONFIG_BYTES = 1 << 20


def _yaml_without_aliases(raw: bytes):
    """yaml.safe_load, refusing aliases (``*name``): aliases of aliases expand exponentially (a few
    hundred bytes of "billion laughs" hold 10**9 items), and a settings file needs none."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"found the alias *{event.anchor[:40]}: aliases are "
                                                              "not accepted in a settings file", event.start_mark)
            return super().compose_node(parent, index)

    return yaml.load(raw, Loader=NoAliases)


def read_config_file(path: str) -> dict:
    """Settings from a TOML (.toml) or YAML (.yaml/.yml) file; keys are EvalConfig fields, at the top
    level or all inside an ``eval`` table.  At most ``_MAX_CONFIG_BYTES``; YAML aliases refused."""
    if not os.path.isfile(path):
        raise ConfigError("config", f"no such file: {path!r}")
    with open(path, "rb") as f:
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError("config", f"{path!r} is larger than {_MAX_CONFIG_BYTES:,} bytes: not a settings file")
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
                import tomli as tomllib

            doc = tomllib.loads(raw.decode())
        else:
            doc = _yaml_without_aliases(raw) or {}
    except Exception as e:  # parse errors of either format (a RecursionError for absurd nesting)
        raise ConfigError("config", f"cannot parse {path!r}: {str(e)[:500]}") from None
    if isinstance(doc, dict) and isinstance(doc.get("eval"), dict):
        others = [str(k)[:60] for k in doc if k != "eval"]
        if others:
            raise ConfigError("config", f"{path!r} has an [eval] table and settings outside it ({others[:5]}), "
                                        "which would be ignored: put them inside the table")
        doc = doc["eval"]
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{path!r}: expected a table/mapping of settings")
    known = {f.name for f in fields(EvalConfig)}
    out = {}
    for key, value in doc.items():
        if not isinstance(key, str):
            raise ConfigError("config", f"{path!r}: the key {str(key)[:60]!r} is a {type(key).__name__}, "
                                        "not a setting's name")
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(name[:60], f"unknown setting in {path!r}; expected one of {sorted(known)}")
        out[name] = value
    return out

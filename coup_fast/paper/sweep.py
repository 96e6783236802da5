"""Clean and robust accuracy against t* and against lam (Sec. 5.4, Fig. 4 of arXiv 2408.05900).

Each point is COUP (`PurifiedClassifier`, mode 'coup'), or with defense 'coup-lm' the DDPM variant of Sec. 5.2.1
(likelihood maximization with guidance lam, coup_fast.lm), swept against M, the LM steps, and lam (lam = 0 is LM
without guidance).  The attacker differentiates with `gradient` (default 'exact', the discrete adjoint; any of
coup_fast.evaluate.ATTACK_GRADIENTS).

**The attack, named.**  By default one attack, APGD-CE under L-inf (EOT draws per gradient: `eot`, default 1,
drawn in one batched call): the paper's Fig. 4, and a weak attack on a stochastic defense (on digits COUP reads
about 80 % under it, against 28 % for `coup-fast eval`'s worst case).  `attacks` (and the literature's budgets,
`protocol`, coup_fast.protocols) give the evaluation's worst case instead, computed as `coup-fast eval` computes it
(coup_fast.evaluate's `reevaluate` and `select_worst`): every attack's candidates are purified R = `n_eval` times,
per image the worst candidate is kept, and an image's robust accuracy is its minimum over the clean image and
every attack.  Two numbers per point, as eval reports them: **Avg** (the fraction of the R purifications
classified correctly, averaged over images; 95 % Korn-Graubard interval) and **Worst-of-R** (the fraction of
images whose R purifications are all correct; 95 % Wilson interval), coup_fast.stats.  The JSON and the figure
name the attacks, their budgets and the gradient.  Default: the embedded digits models on a small seeded test
subset with few APGD iterations (sized for 2 CPU cores); CIFAR-10 or CIFAR-100 when the data and checkpoints are
given.

Each finished (t*, lam) or (M, lam) point is written to OUT/cells/ as it completes; rerunning the same
command after an interruption resumes from those points (they are keyed by the config and by
the networks and images, so a different run never reuses them), and they are removed once
sweep.csv, sweep.json and sweep.png are written.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm import tqdm

from . import CELLS_DIR, CellStore, check_out_dir, fingerprint, write_outputs
from .. import attacks, stats
from .. import data as datasets  # (`data` is the name of the data-set argument)
from ..evaluate import ATTACK_GRADIENTS, CLEAN, batch_seed, reevaluate, select_worst
from ..lm import LMConfig, index_eps_model
from ..models import ddpm, digits, ncsnpp, wideresnet
from ..protocols import PROTOCOLS
from ..purify import PurifiedClassifier

DATASETS = ("digits", "cifar10", "cifar100")
CIFAR_DATASETS = ("cifar10", "cifar100")
SUBSETS = ("paper", "seeded")  # coup_fast.data.load_cifar's image subsets
OUTPUT_FILES = ("sweep.csv", "sweep.json", "sweep.png")
DEFENSES = ("coup", "coup-lm")  # the SDE purifier (axes t*, lam) or the likelihood-max one (axes M, lam)
AXES = {"coup": "t_star", "coup-lm": "lm_steps"}  # the first axis; the second is lam
M_GRID = (1, 2, 5, 10)  # LM steps of the M axis (Chen et al.'s M = 5 among them)
# Digits: eps 0.15 on 8x8 images in [0, 1] (coup_fast.cli's digits preset), dt = 1e-2 (10 steps at
# t* = 0.1), 10 APGD iterations.  CIFAR-10 and CIFAR-100: the paper's 8/255, dt = 1e-3, 100 APGD iterations.
_CIFAR_PRESET = dict(n_images=64, eps=8 / 255, dt=1e-3, n_iter=100, batch_size=32,
                     t_grid=(0.025, 0.05, 0.075, 0.1, 0.125, 0.15), lam_grid=(0.0, 0.5, 1.0, 2.0, 4.0))
PRESETS = {
    "digits": dict(n_images=48, eps=0.15, dt=1e-2, n_iter=10, batch_size=48,
                   t_grid=(0.02, 0.05, 0.1, 0.2, 0.4), lam_grid=(0.0, 0.5, 1.0, 2.0, 5.0)),
    "cifar10": _CIFAR_PRESET,
    "cifar100": _CIFAR_PRESET,
}
# The budgets of the attacks other than APGD-CE (AttackSettings fields): on digits `coup-fast eval`'s digits preset
# (AutoAttack-rand EOT 2, PGD-EOT 10 x 4, BPDA-EOT 20 x 4, FAB-T 10, Square 100), on CIFAR AttackSettings'
# defaults (the paper's).  APGD's iterations are the sweep's n_iter, APGD-CE's EOT its eot; a protocol overrides.
ATTACK_BUDGETS = {"digits": dict(eot=2, pgd_iter=10, pgd_eot=4, bpda_iter=20, bpda_eot=4, fab_iter=10,
                                 square_queries=100),
                  "cifar10": {}, "cifar100": {}}
ATTACK_NAMES = {"apgd-ce": "APGD-CE", "aa": "AutoAttack standard + rand", "aa-standard": "AutoAttack standard",
                "aa-rand": "AutoAttack rand", "pgd-eot": "PGD-EOT", "bpda-eot": "BPDA-EOT"}
_SETTING_NAMES = {f.name for f in fields(attacks.AttackSettings)}


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: data, budget and the two axes (lam fixed on the t* axis, t* fixed on the lam axis)."""

    data: str = "digits"
    n_images: int = 48
    seed: int = 0
    eps: float = 0.15
    dt: float = 1e-2
    n_iter: int = 10
    batch_size: int = 48
    t_grid: tuple = (0.02, 0.05, 0.1, 0.2, 0.4)
    lam_grid: tuple = (0.0, 0.5, 1.0, 2.0, 5.0)
    t_star: float = 0.1  # fixed on the lam axis
    lam: float = 1.0  # fixed on the t* axis
    engine: str = "auto"  # purify's engine; 'compile' compiles once (shapes and lam do not change the graphs)
    n_eval: int = 4  # purifications of each clean and each adversarial image
    eot: int = 1  # EOT draws per APGD-CE gradient
    defense: str = "coup"  # or 'coup-lm': sweep M (m_grid, lam fixed) and lam (M fixed at lm_steps)
    m_grid: tuple = M_GRID  # coup-lm: LM steps of the first axis
    lm_steps: int = 5  # coup-lm: M on the lam axis
    attacks: tuple = ("apgd-ce",)  # robust accuracy: per image the worst over the clean image and these attacks
    gradient: str = "exact"  # the attacker's gradient (purify's `gradient`)
    protocol: tuple = ()  # the literature's budgets applied (coup_fast.protocols), named in the outputs
    budget: dict = field(default_factory=dict)  # AttackSettings values beyond n_iter and eot (None: ATTACK_BUDGETS)

    def __post_init__(self):
        if self.defense not in DEFENSES:
            raise ValueError(f"defense: expected one of {DEFENSES}, got {self.defense!r}")
        bad = [a for a in self.attacks if a not in attacks.ATTACKS]
        if not self.attacks or bad or len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks: expected distinct names from {attacks.ATTACKS}, got {self.attacks!r}")
        if self.gradient not in ATTACK_GRADIENTS or (self.defense == "coup-lm" and self.gradient == "adjoint"):
            allowed = tuple(g for g in ATTACK_GRADIENTS if self.defense == "coup" or g != "adjoint")
            raise ValueError(f"gradient: expected one of {allowed} for defense {self.defense!r}, got {self.gradient!r}")
        unknown = sorted(set(self.budget) - _SETTING_NAMES)
        if unknown:
            raise ValueError(f"budget: {unknown[0]!r} is not an attack setting ({sorted(_SETTING_NAMES)})")

    @classmethod
    def preset(cls, data: str, protocol=(), **overrides) -> "SweepConfig":
        """The data set's preset, then the protocols' values where `overrides` leave a field None (flags win),
        as `coup-fast eval` applies them."""
        if data not in DATASETS:
            raise ValueError(f"data: expected one of {DATASETS}, got {data!r}")
        unknown = [p for p in protocol if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"protocol: unknown protocol {unknown[0]!r}; expected some of {tuple(PROTOCOLS)}")
        chosen = {}
        for name in protocol:
            chosen.update(PROTOCOLS[name][1])
        settings = {k: v for k, v in overrides.items() if v is not None}
        for key, value in chosen.items():  # a protocol's 'eot' is AutoAttack-rand's: the sweep's eot is APGD-CE's
            if key in ("attacks", "n_eval", "n_iter") and key not in settings:
                settings[key] = tuple(value) if key == "attacks" else value
        budget = {k: v for k, v in chosen.items() if k in _SETTING_NAMES and k not in ("n_iter", "apgd_eot")}
        return cls(data=data, protocol=tuple(protocol), budget={**settings.pop("budget", {}), **budget},
                   **{**PRESETS[data], **settings})

    def attack_settings(self) -> attacks.AttackSettings:
        """The attacks' budgets: ATTACK_BUDGETS of the data set, the protocols', then n_iter (APGD) and eot
        (APGD-CE's EOT draws per gradient)."""
        return attacks.AttackSettings(**{**ATTACK_BUDGETS[self.data], **self.budget, "n_iter": self.n_iter,
                                         "apgd_eot": self.eot})

    def attack_description(self) -> str:
        """The attack in words, with its budget and the attacker's gradient (the figure's and the JSON's)."""
        s = self.attack_settings()
        budgets = {"apgd-ce": f"{s.n_iter} it., EOT {s.apgd_eot}",
                   "aa": f"APGD {s.n_iter} it., rand EOT {s.eot}", "aa-standard": f"APGD {s.n_iter} it.",
                   "aa-rand": f"APGD {s.n_iter} it., EOT {s.eot}",
                   "pgd-eot": f"{s.pgd_iter} it. x EOT {s.pgd_eot}" + ("" if s.pgd_random_start else ", from x"),
                   "bpda-eot": f"{s.bpda_iter} it. x EOT {s.bpda_eot}"}
        named = ", ".join(f"{ATTACK_NAMES[a]} ({budgets[a]})" for a in self.attacks)
        what = (f"{named}, a single attack: an upper bound, not the worst case (--attacks, coup-fast eval)"
                if len(self.attacks) == 1 else f"worst case over {named}")
        protocol = f", protocol {'+'.join(self.protocol)}" if self.protocol else ""
        return f"{what}; L-inf eps {self.eps:.3g}; {self.gradient} gradient{protocol}; R = {self.n_eval}"

    def points(self) -> list:
        """(axis, first-axis value, lam) of every point: t* (coup) or M (coup-lm) at lam, then lam at t* or M."""
        axis = AXES[self.defense]
        first, fixed = (self.t_grid, self.t_star) if axis == "t_star" else (self.m_grid, self.lm_steps)
        return [(axis, v, self.lam) for v in first] + [("lam", fixed, lam) for lam in self.lam_grid]


def load_problem(data: str = "digits", *, n_images: int = 48, seed: int = 0, device="cpu", cifar_dir=None,
                 score_ckpt=None, classifier_ckpt=None, wrn_depth: int = 28, wrn_widen: int = 10,
                 weights_dir=None, subset: str | None = None, defense: str = "coup", ddpm_ckpt=None):
    """(network, classifier, x, y): x (n, C, H, W) in [0, 1] on `device`, a test subset; the network is the score
    model (defense 'coup') or the eps-network on the DDPM index (defense 'coup-lm').

    digits: `coup_fast.models.load_digits_models` (coup-lm: its score model through coup_fast.lm.index_eps_model)
    and `coup_fast.data.load_digits('test')` (a seeded subset); cifar10 / cifar100:
    `coup_fast.data.load_cifar(cifar_dir, dataset=data, subset=subset)` (subset None: 'paper', the images
    DiffPure and COUP evaluate; 'seeded': a seeded torch permutation), `load_ncsnpp(score_ckpt)` (coup-lm:
    `load_ddpm(ddpm_ckpt)`) and `load_wideresnet(classifier_ckpt)` with 10 or 100 classes.
    """
    if defense not in DEFENSES:
        raise ValueError(f"defense: expected one of {DEFENSES}, got {defense!r}")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images <= 0:
        raise ValueError(f"n_images: expected an integer > 0, got {n_images!r}")
    if subset is not None and subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {SUBSETS}, got {subset!r}")
    if data == "digits":
        if subset == "paper":
            raise ValueError("subset: 'paper' is the CIFAR test subset of DiffPure and COUP; digits has only "
                             "its seeded subset")
        score_model, classifier = digits.load_digits_models(device=device, weights_dir=weights_dir)
        if defense == "coup-lm":
            score_model = index_eps_model(score_model)
        x, y = datasets.load_digits("test", n=n_images, seed=seed)
    elif data in CIFAR_DATASETS:
        network = ("--score-ckpt", score_ckpt) if defense == "coup" else ("--ddpm-ckpt", ddpm_ckpt)
        missing = [n for n, v in (("--cifar-dir", cifar_dir), network, ("--classifier-ckpt", classifier_ckpt)) if not v]
        if missing:
            raise ValueError(f"data={data!r} needs {', '.join(missing)}")
        # the images first: a wrong --cifar-dir is reported before minutes of checkpoint loading
        x, y = datasets.load_cifar(cifar_dir, "test", n=n_images, seed=seed, dataset=data, subset=subset or "paper")
        score_model = (ncsnpp.load_ncsnpp(score_ckpt, device=device) if defense == "coup"
                       else ddpm.load_ddpm(ddpm_ckpt, device=device))
        classifier = wideresnet.load_wideresnet(classifier_ckpt, wrn_depth, wrn_widen, device=device,
                                     num_classes=100 if data == "cifar100" else 10)
        for m in (score_model, classifier):
            m.to(device).eval().requires_grad_(False)
    else:
        raise ValueError(f"data: expected one of {DATASETS}, got {data!r}")
    return score_model, classifier, x.to(device), y.to(device)


def apgd_ce(model, x, y, *, eps: float, n_iter: int, seed: int = 0, eot: int = 1):
    """APGD-CE, L-inf, `eot` draws per gradient (coup_fast.attacks.apgd_ce: pyautoattack's APGDAttack)."""
    return attacks.apgd_ce(model, x, y, norm="Linf", eps=eps, seed=seed, settings=attacks.AttackSettings(n_iter=n_iter),
                           eot=eot)


def accuracy_point(score_model, classifier, x, y, *, t_star: float, lam: float, dt: float, eps: float,
                   n_iter: int, batch_size: int, seed: int = 0, engine: str = "auto", n_eval: int = 4,
                   eot: int = 1, defense: str = "coup", lm_steps: int = 5, attack_names=("apgd-ce",),
                   gradient: str = "exact", settings: attacks.AttackSettings | None = None) -> dict:
    """Clean and robust accuracy of COUP(t*, lam), or of COUP-LM(M = lm_steps, lam) (score_model is then the
    eps-network on the DDPM index; t_star and dt unused), on (x, y), in batches, as `coup-fast eval` measures them.

    Every attack of `attack_names` (coup_fast.attacks.run_attack, L-inf eps, `gradient` for the attacker, budgets
    `settings`, default AttackSettings(n_iter, apgd_eot=eot)) returns candidates; each is purified n_eval times and
    per image the worst is kept (coup_fast.evaluate.reevaluate, select_worst); the clean image is purified
    n_eval times too.  Robust: per image the worst over the clean image and the attacks.  Returns Avg and
    Worst-of-R with 95 % intervals (fractions) for clean and robust, and per attack its own Avg and Worst-of-R."""
    settings = attacks.AttackSettings(n_iter=n_iter, apgd_eot=eot) if settings is None else settings
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if defense == "coup-lm":
        model = PurifiedClassifier(score_model, classifier, mode="likelihood-max", lam=lam, lm=LMConfig(n_steps=lm_steps),
                                   gradient=gradient, generator=gen)
    else:
        model = PurifiedClassifier(score_model, classifier, t_star=t_star, lam=lam, dt=dt, mode="coup",
                                   gradient=gradient, generator=gen, engine=engine)
    columns = [CLEAN, *attack_names]
    kept = {name: [] for name in columns}  # per column, (n_eval, B) verdicts of the kept candidate, per batch
    for b, i in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        for name in columns:
            torch.manual_seed(batch_seed(seed, (name,), b))
            candidates = {CLEAN: xb} if name == CLEAN else attacks.run_attack(
                name, model, xb, yb, norm="Linf", eps=eps, seed=batch_seed(seed, (name, "attack"), b) % 2**31,
                settings=settings)
            _, correct, loss = reevaluate(model, candidates, yb, n_eval, settings.eot_chunk)
            chosen = select_worst(correct, loss)
            kept[name].append(correct[chosen, :, torch.arange(correct.shape[2])].T)
    verdicts = {name: torch.cat(parts, 1) for name, parts in kept.items()}  # (n_eval, n) bool
    robust = torch.stack([verdicts[name] for name in columns]).all(0).all(0)  # every run of every column
    acc = torch.stack([verdicts[name].double().mean(0) for name in columns]).min(0).values
    where = {"lm_steps": lm_steps} if defense == "coup-lm" else {"t_star": t_star}
    row = {**where, "lam": lam, **_summary("clean", verdicts[CLEAN].double().mean(0), verdicts[CLEAN].all(0), n_eval),
           **_summary("robust", acc, robust, n_eval)}
    for name in attack_names:
        row[f"{name}_acc"] = float(verdicts[name].double().mean())
        row[f"{name}_worst"] = float(verdicts[name].all(0).double().mean())
    return {**row, "n": int(x.shape[0]), "n_eval": n_eval, "eot": eot}


def _summary(prefix: str, acc: torch.Tensor, robust: torch.Tensor, runs: int) -> dict:
    """Avg (mean of the per-image accuracies acc) and Worst-of-R (fraction of images with `robust`), each with its
    95 % interval as coup_fast.evaluate reports them (coup_fast.stats), as fractions."""
    lo, hi = stats.mean_interval(acc.tolist(), runs)
    worst_lo, worst_hi = stats.wilson_interval(int(robust.sum()), int(robust.numel()))
    return {f"{prefix}_acc": float(acc.mean()), f"{prefix}_lo": lo, f"{prefix}_hi": hi,
            f"{prefix}_worst": float(robust.double().mean()), f"{prefix}_worst_lo": worst_lo,
            f"{prefix}_worst_hi": worst_hi}


def run_sweep(cfg: SweepConfig, out_dir: str | None = "results/paper", *, problem=None, device="cpu",
              progress: bool = True, **load_kwargs) -> dict:
    """Both axes of Fig. 4: accuracy vs t* (lam = cfg.lam) and vs lam (t* = cfg.t_star); for defense 'coup-lm'
    vs M (cfg.m_grid, lam = cfg.lam) and vs lam (M = cfg.lm_steps).

    problem: optional (network, classifier, x, y) instead of `load_problem` (network: the score model, or for
    'coup-lm' an eps-network on the DDPM index, e.g. coup_fast.lm.index_eps_model(score_model)).  Writes sweep.csv,
    sweep.json and sweep.png under out_dir (skipped when None); returns the JSON dict.  out_dir is
    checked for writing before anything is loaded; each finished point is kept in out_dir/cells/
    until the outputs are written, and a rerun with the same config, networks and images resumes
    from them.
    """
    start = time.perf_counter()
    if out_dir is not None:
        check_out_dir(out_dir, OUTPUT_FILES)
    if problem is None:
        problem = load_problem(cfg.data, n_images=cfg.n_images, seed=cfg.seed, device=device, defense=cfg.defense,
                               **load_kwargs)
    score_model, classifier, x, y = problem
    # everything that changes a point's numbers; the grids only choose which points there are, and the other
    # defense's settings do not enter (LM has no t*, dt or engine; the SDE no M)
    unused = ("t_grid", "lam_grid", "m_grid") + (("t_star", "dt", "engine") if cfg.defense == "coup-lm" else
                                                  ("lm_steps",))
    setting = {k: v for k, v in asdict(cfg).items() if k not in unused}
    cells = CellStore(None if out_dir is None else os.path.join(out_dir, CELLS_DIR),
                      {"study": "sweep", "config": setting, "device": str(torch.device(device)),
                       "problem": fingerprint(score_model, classifier, x, y)})
    lm = cfg.defense == "coup-lm"

    def name(first, lam):
        return f"m{int(first)}-lam{float(lam)!r}" if lm else f"t{float(first)!r}-lam{float(lam)!r}"

    points = cfg.points()
    rows, done = [], {}
    for first, lam in dict.fromkeys((v, lam) for _, v, lam in points):
        cached = cells.get(name(first, lam))
        if cached is not None:
            done[first, lam] = cached
    if done and progress:
        print(f"sweep: resuming, {len(done)} point(s) already done in {cells.directory}", file=sys.stderr)
    for axis, first, lam in tqdm(points, desc=f"sweep ({cfg.data}, {cfg.defense})", disable=not progress):
        if (first, lam) not in done:  # the fixed point lies on both axes: run it once
            where = dict(t_star=cfg.t_star, lm_steps=first, defense="coup-lm") if lm else dict(t_star=first)
            done[first, lam] = accuracy_point(score_model, classifier, x, y, lam=lam, dt=cfg.dt, eps=cfg.eps,
                                              n_iter=cfg.n_iter, batch_size=cfg.batch_size, seed=cfg.seed,
                                              engine=cfg.engine, n_eval=cfg.n_eval, eot=cfg.eot,
                                              attack_names=cfg.attacks, gradient=cfg.gradient,
                                              settings=cfg.attack_settings(), **where)
            cells.put(name(first, lam), done[first, lam])
        rows.append({"axis": axis, **done[first, lam]})
    attack = {"description": cfg.attack_description(), "attacks": list(cfg.attacks), "gradient": cfg.gradient,
              "protocol": list(cfg.protocol), "settings": asdict(cfg.attack_settings()),
              "robust": "per image the worst over the clean image and every attack's kept candidate (coup-fast "
                        "eval's 'all attacks'); Avg: mean over images of the fraction of R purifications correct, "
                        "95 % Korn-Graubard interval; Worst-of-R: fraction of images with all R correct, 95 % Wilson "
                        "interval"}
    result = {"config": asdict(cfg), "attack": attack, "rows": rows, "seconds": time.perf_counter() - start}
    if out_dir is not None:
        write_sweep(result, out_dir)
        cells.clear()
    return result


def write_sweep(result: dict, out_dir: str) -> dict:
    """sweep.csv, sweep.json, sweep.png (Fig. 4 a/b) under out_dir; returns their paths."""
    return write_outputs(result, out_dir, "sweep", plot_sweep)


def axis_scale(values) -> tuple:
    """('log',) for a geometric grid (positive, roughly constant ratios), ('symlog', linthresh) for 0 followed by a
    geometric grid (lam = 0, 0.5, 1, 2, 5), else ('linear',)."""
    values = sorted(float(v) for v in values)
    positive = [v for v in values if v > 0]
    if len(positive) < 3 or len(positive) < len(values) - 1 or (values[0] < 0):
        return ("linear",)
    ratios = [math.log(b / a) for a, b in zip(positive, positive[1:])]
    mean = sum(ratios) / len(ratios)
    spread = (sum((r - mean) ** 2 for r in ratios) / len(ratios)) ** 0.5
    if not (mean > math.log(1.5) and spread < 0.35 * mean):
        return ("linear",)
    return ("log",) if len(positive) == len(values) else ("symlog", positive[0])


def plot_sweep(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    if cfg.get("defense", "coup") == "coup-lm":
        panels = ((axes[0], "lm_steps", "likelihood-maximization steps M", f"COUP-LM, lam = {cfg['lam']:g}"),
                  (axes[1], "lam", "guidance weight lam (0: LM)", f"COUP-LM, M = {cfg['lm_steps']}"))
    else:
        panels = ((axes[0], "t_star", "purification time t*", f"COUP, lam = {cfg['lam']:g}"),
                  (axes[1], "lam", "guidance weight lam", f"COUP, t* = {cfg['t_star']:g}"))
    lines = (("clean", "clean_acc", "clean_lo", "clean_hi", "o-", "clean (Avg)"),
             ("robust", "robust_acc", "robust_lo", "robust_hi", "s-", "robust (Avg)"),
             ("robust", "robust_worst", "robust_worst_lo", "robust_worst_hi", "^--", "robust (Worst-of-R)"))
    for ax, axis, label, fixed in panels:
        rows = sorted((r for r in result["rows"] if r["axis"] == axis), key=lambda r: r[axis])
        xs = [r[axis] for r in rows]
        for _, key, lo, hi, marker, name in lines:
            if not rows or key not in rows[0]:
                continue
            ys = [100 * r[key] for r in rows]
            err = [[y - 100 * r[lo] for y, r in zip(ys, rows)], [100 * r[hi] - y for y, r in zip(ys, rows)]]
            ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=2, label=name)
        scale = axis_scale(xs)
        if scale[0] == "log":
            ax.set_xscale("log")
        elif scale[0] == "symlog":
            ax.set_xscale("symlog", linthresh=scale[1])
        if scale[0] != "linear":
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
        ax.set_xlabel(label + ("" if scale[0] == "linear" else f" ({scale[0]} axis)"))
        ax.set_ylabel(f"accuracy (%), R = {cfg['n_eval']}, 95 % interval")
        ax.set_title(f"{cfg['data']}, {fixed}, n = {cfg['n_images']}", fontsize=9)
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    description = result.get("attack", {}).get("description", "APGD-CE")
    fig.suptitle(f"robust: {description}", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)

"""Clean and robust accuracy against t* and against lam (Sec. 5.4, Fig. 4 of arXiv 2408.05900).

Each point is COUP (`PurifiedClassifier`, mode 'coup', exact adjoint gradient) attacked with
APGD-CE under L-inf (EOT draws per gradient: `eot`, default 1, drawn in one batched call); or, with
defense 'coup-lm', the DDPM variant of Sec. 5.2.1 (likelihood maximization with guidance lam,
coup_fast.lm, exact gradient), swept against M, the LM steps, and lam (lam = 0 is LM without
guidance).  Clean and robust accuracy are the
purified classifier's accuracy on the clean and on the final adversarial images, averaged over
`n_eval` fresh purifications of each, ± the standard error over images of the per-image
accuracy.  Default: the embedded digits models on a
small seeded test subset with few APGD iterations (sized for 2 CPU cores); CIFAR-10 or CIFAR-100
when the data and checkpoints are given.

Each finished (t*, lam) or (M, lam) point is written to OUT/cells/ as it completes; rerunning the same
command after an interruption resumes from those points (they are keyed by the config and by
the networks and images, so a different run never reuses them), and they are removed once
sweep.csv, sweep.json and sweep.png are written.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import CELLS_DIR, CellStore, check_out_dir, fingerprint, write_outputs
from .. import attacks
from .. import data as datasets  # (`data` is the name of the data-set argument)
from ..lm import LMConfig, index_eps_model
from ..models import ddpm, digits, ncsnpp, wideresnet
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

    def __post_init__(self):
        if self.defense not in DEFENSES:
            raise ValueError(f"defense: expected one of {DEFENSES}, got {self.defense!r}")

    @classmethod
    def preset(cls, data: str, **overrides) -> "SweepConfig":
        if data not in DATASETS:
            raise ValueError(f"data: expected one of {DATASETS}, got {data!r}")
        return cls(data=data, **{**PRESETS[data], **{k: v for k, v in overrides.items() if v is not None}})

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
                   eot: int = 1, defense: str = "coup", lm_steps: int = 5) -> dict:
    """Clean and APGD-CE robust accuracy of COUP(t*, lam), or of COUP-LM(M = lm_steps, lam) (score_model is then
    the eps-network on the DDPM index; t_star and dt unused), on (x, y), in batches, each image purified
    n_eval times; ± the standard error over images of their accuracy over the n_eval draws."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if defense == "coup-lm":
        model = PurifiedClassifier(score_model, classifier, mode="likelihood-max", lam=lam, lm=LMConfig(n_steps=lm_steps),
                                   gradient="exact", generator=gen)
    else:
        model = PurifiedClassifier(score_model, classifier, t_star=t_star, lam=lam, dt=dt, mode="coup",
                                   gradient="exact", generator=gen, engine=engine)

    def per_image_accuracy(xb, yb):  # (B,): fraction of the n_eval purifications classified correctly
        with torch.no_grad():
            return torch.stack([(model(xb).argmax(1) == yb).double() for _ in range(n_eval)]).mean(0)

    clean, robust = [], []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        clean.append(per_image_accuracy(xb, yb))
        x_adv = apgd_ce(model, xb, yb, eps=eps, n_iter=n_iter, seed=seed, eot=eot)
        robust.append(per_image_accuracy(x_adv, yb))
    clean, robust = torch.cat(clean), torch.cat(robust)
    n = x.shape[0]
    se = lambda a: float(a.std() / n**0.5) if n > 1 else float("nan")  # noqa: E731
    where = {"lm_steps": lm_steps} if defense == "coup-lm" else {"t_star": t_star}
    return {**where, "lam": lam, "clean_acc": float(clean.mean()), "clean_se": se(clean),
            "robust_acc": float(robust.mean()), "robust_se": se(robust), "n": n, "n_eval": n_eval, "eot": eot}


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
                                              engine=cfg.engine, n_eval=cfg.n_eval, eot=cfg.eot, **where)
            cells.put(name(first, lam), done[first, lam])
        rows.append({"axis": axis, **done[first, lam]})
    result = {"config": asdict(cfg), "rows": rows, "seconds": time.perf_counter() - start}
    if out_dir is not None:
        write_sweep(result, out_dir)
        cells.clear()
    return result


def write_sweep(result: dict, out_dir: str) -> dict:
    """sweep.csv, sweep.json, sweep.png (Fig. 4 a/b) under out_dir; returns their paths."""
    return write_outputs(result, out_dir, "sweep", plot_sweep)


def plot_sweep(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    if cfg.get("defense", "coup") == "coup-lm":
        panels = ((axes[0], "lm_steps", "likelihood-maximization steps M", f"COUP-LM, lam = {cfg['lam']:g}"),
                  (axes[1], "lam", "guidance weight lam (0: LM)", f"COUP-LM, M = {cfg['lm_steps']}"))
    else:
        panels = ((axes[0], "t_star", "purification time t*", f"lam = {cfg['lam']:g}"),
                  (axes[1], "lam", "guidance weight lam", f"t* = {cfg['t_star']:g}"))
    for ax, axis, label, fixed in panels:
        rows = sorted((r for r in result["rows"] if r["axis"] == axis), key=lambda r: r[axis])
        xs = [r[axis] for r in rows]
        for key, marker, name in (("clean", "o-", "clean"), ("robust", "s-", f"robust (APGD-CE, EOT {cfg['eot']})")):
            ax.errorbar(xs, [100 * r[f"{key}_acc"] for r in rows], yerr=[100 * r[f"{key}_se"] for r in rows],
                        fmt=marker, capsize=2, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(f"accuracy (%), mean of {cfg['n_eval']} purifications ± SE")
        ax.set_title(f"{cfg['data']}, {fixed}, eps = {cfg['eps']:.3g}, n = {cfg['n_images']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)

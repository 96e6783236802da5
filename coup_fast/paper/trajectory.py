"""Classifier confidence along the purification path (Sec. 5.3.1, Fig. 2a of arXiv 2408.05900).

1. APGD-CE (L-inf) attacks COUP without guidance (mode 'reverse') with the Brownian motion
   switched off (z_k = 0, as in the paper's case study), so the attacked map is the one analysed.
2. The failures are the images that this purifier classifies correctly when clean and wrongly
   after the attack; y_adv is the wrong label it then predicts.
3. For each failure, the noise-free path from x_adv at t* to 0 is run through the engine's solver
   (`coup_fast.solver.solve`, a callback reading each state) with lam = 0 and with guidance lam,
   recording p(y_true | x_t) and p(y_adv | x_t) at t_0 = t* and after every step.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import check_out_dir
from .._files import atomic_write, atomic_write_text
from ..guidance import image_to_state, state_to_image
from ..networks import EagerNetworks
from ..purify import purify
from ..solver import NoiseStream, PurifyConfig, plain_drift, solve
from ..sde import ReverseGrid
from .sweep import apgd_ce, load_problem

DEFAULTS = dict(n_images=32, eps=0.15, t_star=0.1, dt=1e-3, lam=1.0, n_iter=10)
OUTPUT_FILES = ("trajectory.npz", "trajectory.json", "trajectory.png")


class NoiselessPurified(nn.Module):
    """classifier(purify(u, noise = 0)): the deterministic purifier of the case study, differentiable."""

    def __init__(self, score_model, classifier, *, t_star: float, dt: float, lam: float = 0.0, mode: str = "reverse"):
        super().__init__()
        self.score_model, self.classifier = score_model, classifier
        self.t_star, self.dt, self.lam, self.mode = t_star, dt, lam, mode
        self.n_steps = ReverseGrid.from_dt(t_star, dt).n_steps

    def forward(self, u):
        zeros = torch.zeros(self.n_steps, *u.shape, dtype=u.dtype, device=u.device)
        out = purify(u, self.score_model, self.classifier, t_star=self.t_star, lam=self.lam, dt=self.dt,
                     mode=self.mode, noise=zeros)
        return self.classifier(out)


def confidence_path(u, labels, score_model, classifier, *, t_star: float, dt: float, lam: float,
                    return_final_pred: bool = False):
    """p(labels[j] | x_t) along the noise-free guided path from u (images in [0, 1]).

    labels: (L, B) long, L label sets (e.g. y_true and y_adv).  Returns (L, B, N + 1) float:
    column 0 at t = t*, column k + 1 after step k.  lam = 0 is COUP without guidance.
    return_final_pred: also the classifier's prediction at t = 0, (B,) (the purifier's output class).
    """
    grid = ReverseGrid.from_dt(t_star, dt)
    config = PurifyConfig(grid, float(lam), "coup")
    x = image_to_state(u)
    stream = NoiseStream(x, config, noise=torch.zeros(grid.n_steps, *x.shape, dtype=x.dtype, device=x.device))
    columns, last = [], []

    def record(state):
        with torch.no_grad():
            p = torch.softmax(classifier(state_to_image(state).clamp(0.0, 1.0)), dim=1)
        columns.append(torch.stack([p.gather(1, lab[:, None])[:, 0] for lab in labels]))
        last[:] = [p]

    record(x)
    with torch.no_grad():
        solve(x, config, stream, plain_drift(EagerNetworks(score_model, classifier), config.lam),
              callback=lambda info: record(info["x"]))
    paths = torch.stack(columns, dim=-1).cpu().numpy()
    return (paths, last[0].argmax(1).cpu().numpy()) if return_final_pred else paths


def run_trajectory(out_dir: str | None = "results/paper", *, data: str = "digits", n_images: int = 32,
                   seed: int = 0, eps: float = 0.15, t_star: float = 0.1, dt: float = 1e-3, lam: float = 1.0,
                   n_iter: int = 10, problem=None, device="cpu", progress: bool = True, **load_kwargs) -> dict:
    """Attack COUP w/o guidance, pick the failures, record both confidences with and without guidance.

    Writes trajectory.npz (t, p_true_noguide, p_adv_noguide, p_true_guided, p_adv_guided (n_fail, N + 1),
    final_pred_noguide, final_pred_guided, y_true, y_adv, index) and trajectory.png (means vs step with
    25-75 % bands, as Fig. 2a); returns a summary, with the accuracy of both paths' final predictions.
    out_dir is checked for writing before anything is loaded or attacked.
    """
    start = time.perf_counter()
    if out_dir is not None:
        check_out_dir(out_dir, OUTPUT_FILES)
    if problem is None:
        problem = load_problem(data, n_images=n_images, seed=seed, device=device, **load_kwargs)
    score_model, classifier, x, y = problem
    victim = NoiselessPurified(score_model, classifier, t_star=t_star, dt=dt)
    bar = tqdm(total=3, desc="trajectory", disable=not progress)
    with torch.no_grad():
        clean_pred = victim(x).argmax(1)
    torch.manual_seed(seed)
    x_adv = apgd_ce(victim, x, y, eps=eps, n_iter=n_iter, seed=seed)
    bar.update()
    with torch.no_grad():
        adv_pred = victim(x_adv).argmax(1)
    fail = (clean_pred == y) & (adv_pred != y)
    index = fail.nonzero()[:, 0]
    grid = ReverseGrid.from_dt(t_star, dt)
    t = np.array([grid.t_star - k * grid.h for k in range(grid.n_steps + 1)])
    arrays = {"t": t, "y_true": y[index].cpu().numpy(), "y_adv": adv_pred[index].cpu().numpy(),
              "index": index.cpu().numpy()}
    for name, weight in (("noguide", 0.0), ("guided", lam)):
        if len(index):  # a third class may win at the end: keep the prediction itself, not only p_true vs p_adv
            paths, final_pred = confidence_path(x_adv[index], torch.stack([y[index], adv_pred[index]]), score_model,
                                                classifier, t_star=t_star, dt=dt, lam=weight, return_final_pred=True)
        else:
            paths, final_pred = np.zeros((2, 0, grid.n_steps + 1)), np.zeros(0, dtype=np.int64)
        arrays[f"p_true_{name}"], arrays[f"p_adv_{name}"] = paths[0], paths[1]
        arrays[f"final_pred_{name}"] = final_pred
        bar.update()
    bar.close()
    guided_ok = arrays["p_true_guided"][:, -1] > arrays["p_adv_guided"][:, -1]
    guided_pred_ok = float(guided_ok.mean()) if len(index) else None
    summary = {
        "setup": {"data": data, "n_images": int(x.shape[0]), "seed": seed, "eps": eps, "t_star": t_star, "dt": dt,
                  "lam": lam, "n_iter": n_iter, "attack": "APGD-CE Linf on mode='reverse', noise off"},
        "clean_acc_reverse": float((clean_pred == y).float().mean()),
        "robust_acc_reverse": float((adv_pred == y).float().mean()),
        "n_failures": int(len(index)),
        "final_p_true_noguide_mean": float(arrays["p_true_noguide"][:, -1].mean()) if len(index) else None,
        "final_p_true_guided_mean": float(arrays["p_true_guided"][:, -1].mean()) if len(index) else None,
        "frac_failures_true_beats_adv_guided": guided_pred_ok,
        **{f"final_acc_{name}": float((arrays[f"final_pred_{name}"] == arrays["y_true"]).mean()) if len(index) else None
           for name in ("noguide", "guided")},
        "seconds": time.perf_counter() - start,
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)

        def write_npz(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
                np.savez(f, **arrays)

        atomic_write(os.path.join(out_dir, "trajectory.npz"), write_npz)
        atomic_write_text(os.path.join(out_dir, "trajectory.json"), json.dumps(summary, indent=2))
        atomic_write(os.path.join(out_dir, "trajectory.png"), lambda tmp: plot_trajectory(arrays, summary, tmp))
    summary["arrays"] = arrays
    return summary


def plot_trajectory(arrays: dict, summary: dict, path: str) -> None:
    """Fig. 2a: mean p(y_true|x_t), p(y_adv|x_t) vs purification step, without guidance (left) and with it
    (right); hatched: the 25-75 % range over the failures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(arrays["t"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    # one panel per path, each band hatched in its line's colour: four overlapping translucent bands in two
    # colours on one axis could not be told apart
    panels = {"noguide": (axes[0], "COUP w/o guidance (lam = 0)"),
              "guided": (axes[1], f"guided, lam = {summary['setup']['lam']:g}")}
    colors, hatches = {"true": "tab:green", "adv": "tab:red"}, {"true": "//", "adv": "\\\\"}
    for name, (ax, title) in panels.items():
        for which in ("true", "adv"):
            p, color = arrays[f"p_{which}_{name}"], colors[which]
            if p.shape[0] == 0:
                continue
            lo, hi = np.quantile(p, [0.25, 0.75], axis=0)
            ax.fill_between(steps, lo, hi, facecolor="none", edgecolor=color, hatch=hatches[which], lw=0,
                            label=f"25-75 % of failures, y_{which}")
            ax.plot(steps, p.mean(0), color=color, lw=2, label=f"mean p(y_{which}|x_t)")
        ax.set_xlabel("purification step (t* -> 0)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        if summary["n_failures"]:
            ax.legend(fontsize=7, loc="center right")
    axes[0].set_ylabel("classifier confidence")
    fig.suptitle(f"{summary['setup']['data']}: {summary['n_failures']} failures of COUP w/o guidance under "
                 f"APGD-CE (noise off): y_true vs the adversarial label y_adv", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)

"""`coup-fast paper {toy,trajectory,sweep}`: the paper's analyses, one command each.

`register(subparsers)` adds the `paper` subcommand to coup_fast.cli; `python -m coup_fast.paper.cli`
runs it standalone.  Outputs land in --out (default results/paper/): toy.{csv,json,png},
trajectory.{npz,json,png}, sweep.{csv,json,png}.
"""
from __future__ import annotations

import argparse
import sys

COMMANDS = ("toy", "trajectory", "sweep")
DEFAULT_OUT = "results/paper"


def _number(kind, lo, hi=None, lo_open=True, what=""):
    """An argparse type: a number of `kind` in (lo, hi] ([lo, hi] when lo_open is False)."""
    import math

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


POSITIVE_INT = _number(int, 0, what="an integer > 0")
POSITIVE = _number(float, 0.0, what="a number > 0")
NON_NEGATIVE = _number(float, 0.0, lo_open=False, what="a number >= 0")
T_STAR = _number(float, 0.0, 1.0, what="t* in (0, 1]")


def _list_of(item):
    """An argparse type: a non-empty comma list, each value checked by `item`."""
    def parse(text: str) -> tuple:
        values = tuple(item(v) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected a non-empty comma list, got {text!r}")
        return values
    return parse


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _common(p):
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=1,
                   help="torch CPU threads (default 1: on a shared CPU more threads contend and run slower)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")


def _data_args(p):
    from .sweep import DATASETS

    p.add_argument("--data", choices=DATASETS, default="digits")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--n-images", type=POSITIVE_INT, default=None)
    p.add_argument("--eps", type=POSITIVE, default=None, help="L-inf radius (digits 0.15, cifar10 8/255)")
    p.add_argument("--n-iter", type=POSITIVE_INT, default=None, help="APGD-CE iterations")
    p.add_argument("--dt", type=POSITIVE, default=None)
    p.add_argument("--cifar-dir", help="CIFAR-10 python-version directory or .tar.gz (coup_fast.data.load_cifar)")
    p.add_argument("--score-ckpt", help="Score SDE checkpoint (coup_fast.models.ncsnpp.load_ncsnpp)")
    p.add_argument("--classifier-ckpt", help="WideResNet checkpoint (coup_fast.models.wideresnet.load_wideresnet)")
    p.add_argument("--wrn-depth", type=POSITIVE_INT, default=28)
    p.add_argument("--wrn-widen", type=POSITIVE_INT, default=10)
    p.add_argument("--weights-dir", help="digits weights directory (default: the shipped ones)")


def _load_kwargs(a) -> dict:
    if a.data == "digits":
        return {"weights_dir": a.weights_dir}
    return {"cifar_dir": a.cifar_dir, "score_ckpt": a.score_ckpt, "classifier_ckpt": a.classifier_ckpt,
            "wrn_depth": a.wrn_depth, "wrn_widen": a.wrn_widen}


def run_toy_cmd(a) -> int:
    from .toy import run_toy, toy_table

    r = run_toy(a.out, n_paths=a.n_paths, c_grid=a.c, lam_grid=a.lam, seed=a.seed, progress=a.progress)
    print("label of the purified point, P(x_0 < 0):")
    print(toy_table(r))
    print("path ever below 0, P(min_t x_t < 0) (Prop. 1's flip):")
    print(toy_table(r, "flip_ever"))
    p2 = r["prop2"]
    print(f"exact flip probability (lam = 0): {r['exact_flip_lam0_c0']:.4f}")
    print(f"Prop. 2 (Eq. 8): fraction of paths within the bound, worst cell: global sups "
          f"{p2['min_frac_global']:.4f}, per-path sups {p2['min_frac_per_path']:.4f}")
    print(f"wrote {a.out}/toy.csv, toy.json, toy.png ({r['seconds']:.1f} s)")
    return 0


def run_trajectory_cmd(a) -> int:
    from .trajectory import DEFAULTS, run_trajectory

    if a.data == "cifar10":
        DEFAULTS = {**DEFAULTS, "eps": 8 / 255, "n_iter": 100}
    pick = lambda name: DEFAULTS[name] if getattr(a, name) is None else getattr(a, name)  # noqa: E731
    s = run_trajectory(a.out, data=a.data, n_images=pick("n_images"), seed=a.seed, eps=pick("eps"),
                       t_star=a.t_star, dt=pick("dt"), lam=a.lam, n_iter=pick("n_iter"), device=a.device,
                       progress=a.progress, **_load_kwargs(a))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{s['n_failures']} failures of COUP w/o guidance out of {s['setup']['n_images']} "
          f"(clean {s['clean_acc_reverse']:.3f}, robust {s['robust_acc_reverse']:.3f}); final mean p(y_true): "
          f"w/o guidance {fmt(s['final_p_true_noguide_mean'])}, guided {fmt(s['final_p_true_guided_mean'])}; "
          f"failures classified correctly at t = 0: w/o guidance {fmt(s['final_acc_noguide'])}, "
          f"guided {fmt(s['final_acc_guided'])}")
    print(f"wrote {a.out}/trajectory.npz, trajectory.json, trajectory.png ({s['seconds']:.1f} s)")
    return 0


def run_sweep_cmd(a) -> int:
    from .sweep import SweepConfig, run_sweep

    cfg = SweepConfig.preset(a.data, n_images=a.n_images, seed=a.seed, eps=a.eps, n_iter=a.n_iter, dt=a.dt,
                             t_grid=a.t_grid, lam_grid=a.lam_grid, t_star=a.t_star, lam=a.lam, engine=a.engine,
                             n_eval=a.n_eval, eot=a.eot)
    r = run_sweep(cfg, a.out, device=a.device, progress=a.progress, **_load_kwargs(a))
    for row in r["rows"]:
        print(f"{row['axis']:>6}  t*={row['t_star']:<6g} lam={row['lam']:<5g} clean {row['clean_acc']:.3f} "
              f"± {row['clean_se']:.3f}  robust {row['robust_acc']:.3f} ± {row['robust_se']:.3f}")
    print(f"wrote {a.out}/sweep.csv, sweep.json, sweep.png ({r['seconds']:.1f} s)")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `paper {toy,trajectory,sweep}` to an argparse subparsers object; each sets args.func."""
    from ..graphs import ENGINES
    from . import toy

    paper = subparsers.add_parser("paper", help="the paper's analyses (toy study, trajectories, sweeps)",
                                  description="Sec. 5.3-5.4 of arXiv 2408.05900: " + ", ".join(COMMANDS))
    sub = paper.add_subparsers(dest="paper_command", required=True)

    p = sub.add_parser("toy", help="2-Gaussian label-flip probability vs (c, lam) and Prop. 2 (Fig. 3b)")
    _common(p)
    p.add_argument("--n-paths", type=POSITIVE_INT, default=toy.N_PATHS)
    p.add_argument("--c", type=_list_of(NON_NEGATIVE), default=toy.C_GRID, help="noise levels, comma list")
    p.add_argument("--lam", type=_list_of(NON_NEGATIVE), default=toy.LAM_GRID, help="guidance weights, comma list")
    p.set_defaults(func=_with_threads(run_toy_cmd))

    p = sub.add_parser("trajectory", help="p(y_true|x_t), p(y_adv|x_t) along purification (Fig. 2a)")
    _common(p)
    _data_args(p)
    p.add_argument("--t-star", type=T_STAR, default=0.1)
    p.add_argument("--lam", type=NON_NEGATIVE, default=1.0, help="guidance weight of the guided path")
    p.set_defaults(func=_with_threads(run_trajectory_cmd))

    p = sub.add_parser("sweep", help="clean / APGD-CE robust accuracy vs t* and vs lam (Fig. 4)")
    _common(p)
    _data_args(p)
    p.add_argument("--t-grid", type=_list_of(T_STAR), default=None, help="t* values (lam fixed at --lam)")
    p.add_argument("--lam-grid", type=_list_of(NON_NEGATIVE), default=None, help="lam values (t* fixed at --t-star)")
    p.add_argument("--t-star", type=T_STAR, default=0.1)
    p.add_argument("--lam", type=NON_NEGATIVE, default=1.0)
    p.add_argument("--n-eval", type=POSITIVE_INT, default=None,
                   help="purifications of each clean and each adversarial image (mean and SE over images; default 4)")
    p.add_argument("--eot", type=POSITIVE_INT, default=None,
                   help="EOT draws per APGD-CE gradient (default 1; AutoAttack-rand uses 20)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="purify's engine ('compile': torch.compile'd steps; lam and t* changes do not recompile)")
    p.set_defaults(func=_with_threads(run_sweep_cmd))
    return paper


def _with_threads(fn):
    def run(a):
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        try:
            return fn(a)
        except (ValueError, FileNotFoundError) as e:
            print(f"coup-fast paper {a.paper_command}: error: {e}", file=sys.stderr)
            return 2
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="coup-fast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["paper", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

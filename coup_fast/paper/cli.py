"""`coup-fast paper {toy,trajectory,sweep}`: the paper's analyses, one command each.

`register(subparsers)` adds the `paper` subcommand to coup_fast.cli; `python -m coup_fast.paper.cli`
runs it standalone.  Outputs land in --out (default results/paper/): toy.{csv,json,png},
trajectory.{npz,json,png}, sweep.{csv,json,png}.  --out is created and checked for writing
before any compute; the toy study and the sweep keep their finished cells in --out/cells/, so
rerunning an interrupted command resumes it.  --out, --seed, --threads and --no-progress may
come before or after the subcommand.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from ..attacks import ATTACKS
from ..engines import CHOICES as ENGINES
from ..evaluate import ATTACK_GRADIENTS
from ..protocols import PROTOCOLS
from . import check_out_dir, sweep, toy, trajectory
from .toy import MAX_WEIGHT

COMMANDS = ("toy", "trajectory", "sweep")
DEFAULT_OUT = "results/paper"
# The flags every command takes; their defaults are filled in after parsing, so that a value
# given before the subcommand (`paper --seed 3 toy`) is not overwritten by the subcommand's default.
COMMON_DEFAULTS = {"out": DEFAULT_OUT, "seed": 0, "threads": 1, "progress": True}
MAX_SEED = 2**32 - 1  # numpy's RandomState (the paper's CIFAR subset) takes no larger seed
MAX_THREADS = 1024  # more than any machine's cores; torch.set_num_threads overflows on huge ints
MIN_DT = 1e-5  # at most t*/dt = 100,000 Euler steps per purification
TRAJECTORY_CIFAR = {"eps": 8 / 255, "n_iter": 100}  # trajectory's CIFAR values (the rest: trajectory.DEFAULTS)


def _number(kind, lo, hi=None, lo_open=True, what=""):
    """An argparse type: a number of `kind` in (lo, hi] ([lo, hi] when lo_open is False)."""
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
SEED = _number(int, 0, MAX_SEED, lo_open=False, what="an integer in [0, 2**32 - 1]")
THREADS = _number(int, 0, MAX_THREADS, what=f"an integer in [1, {MAX_THREADS}]")
DT = _number(float, MIN_DT, 1.0, lo_open=False, what=f"dt in [{MIN_DT:g}, 1] (at most t*/dt = 100,000 steps)")
# c and lam: beyond this the toy classifier overflows float32 and guidance goes NaN (coup_fast.paper.toy)
WEIGHT = _number(float, 0.0, MAX_WEIGHT, lo_open=False, what=f"a number in [0, {MAX_WEIGHT:g}]")
WRN_WIDEN = _number(int, 0, 64, what="a widen factor in [1, 64]")
LM_STEPS = _number(int, 0, 1000, what="an integer in [1, 1000]")
# the toy study holds its (steps, paths) float64 noise in memory: 100 steps x 2M paths is 1.6 GB
MAX_PATHS = 2_000_000
N_PATHS = _number(int, 0, MAX_PATHS, what=f"an integer in [1, {MAX_PATHS:,}]")


def _wrn_depth(text: str) -> int:
    """WideResNet depth 6n + 4 (28, 34, 70, ...), at most 202: the network is built before the
    checkpoint's shapes are compared, and a huge depth builds (6n + 4) / 6 blocks per stage first."""
    try:
        depth = int(text)
    except ValueError:
        depth = None
    if depth is None or not 10 <= depth <= 202 or (depth - 4) % 6:
        raise argparse.ArgumentTypeError(f"expected a WideResNet depth 6n + 4 in [10, 202] (28, 70, ...), got {text!r}")
    return depth


def _list_of(item):
    """An argparse type: a non-empty comma list, each value checked by `item`."""
    def parse(text: str) -> tuple:
        values = tuple(item(v) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected a non-empty comma list, got {text!r}")
        return values
    return parse


def _names(allowed):
    """An argparse type: a non-empty comma list of distinct names from `allowed`."""
    def parse(text: str) -> tuple:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in names if v not in allowed]
        if not names or bad or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"expected a comma list of distinct names from {allowed}, got {text!r}")
        return names
    return parse


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the studies run on cpu or cuda"
                                         + ("; a meta tensor has no values to compute with" if device.type == "meta"
                                            else ""))
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _common(p):
    # SUPPRESS: absent unless given, so a value given at the other level survives (COMMON_DEFAULTS fills the rest)
    p.add_argument("--out", default=argparse.SUPPRESS,
                   help=f"output directory, created and checked for writing before any compute (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=SEED, default=argparse.SUPPRESS,
                   help="seed of the noise, the attacks and the image subset, an integer in [0, 2**32 - 1] (default 0)")
    p.add_argument("--threads", type=THREADS, default=argparse.SUPPRESS,
                   help="torch CPU threads (default 1: on a shared CPU more threads contend and run slower)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="turn the tqdm progress bars off (default: on)")


def _data_args(p, digits: dict, cifar: dict):
    """The data and budget flags; `digits` / `cifar`: the command's defaults there (n_images, eps, n_iter, dt)."""
    p.add_argument("--data", choices=sweep.DATASETS, default="digits",
                   help="digits (embedded models, default), or cifar10 / cifar100 (needs --cifar-dir, --score-ckpt, "
                        "--classifier-ckpt)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--n-images", type=POSITIVE_INT, default=None,
                   help=f"test images (default: digits {digits['n_images']}, CIFAR {cifar['n_images']})")
    p.add_argument("--eps", type=POSITIVE, default=None,
                   help=f"L-inf radius in [0, 1] pixel units (default: digits {digits['eps']:g}, CIFAR 8/255)")
    p.add_argument("--n-iter", type=POSITIVE_INT, default=None,
                   help=f"APGD iterations (default: digits {digits['n_iter']}, CIFAR {cifar['n_iter']})")
    p.add_argument("--dt", type=DT, default=None, help=f"Euler step, in [{MIN_DT:g}, 1] (default: digits "
                                                        f"{digits['dt']:g}, CIFAR {cifar['dt']:g})")
    p.add_argument("--cifar-dir", help="CIFAR-10/100 python-version directory or .tar.gz (coup_fast.data.load_cifar; "
                                       "default none: required with --data cifar10 / cifar100)")
    p.add_argument("--subset", choices=sweep.SUBSETS, default=None,
                   help="CIFAR test images: 'paper' (default: DiffPure's and COUP's "
                        "np.random.RandomState(seed).choice(10000, n, replace=False)) or 'seeded' (a torch permutation)")
    p.add_argument("--score-ckpt", help="Score SDE checkpoint (coup_fast.models.ncsnpp.load_ncsnpp; default none: "
                                        "required on CIFAR)")
    p.add_argument("--classifier-ckpt", help="WideResNet checkpoint (coup_fast.models.wideresnet.load_wideresnet; "
                                             "default none: required on CIFAR)")
    p.add_argument("--wrn-depth", type=_wrn_depth, default=28, help="WideResNet depth, 6n + 4 (default 28)")
    p.add_argument("--wrn-widen", type=WRN_WIDEN, default=10, help="WideResNet widen factor (default 10)")
    p.add_argument("--weights-dir", help="digits weights directory (default: the shipped ones)")


def _load_kwargs(a) -> dict:
    if a.data == "digits":
        if a.subset is not None:
            raise ValueError("--subset: applies to --data cifar10 / cifar100 only")
        if getattr(a, "ddpm_ckpt", None) is not None:
            raise ValueError("--ddpm-ckpt: applies to --data cifar10 / cifar100 (digits use the shipped score model "
                             "through coup_fast.lm.index_eps_model)")
        return {"weights_dir": a.weights_dir}
    out = {"cifar_dir": a.cifar_dir, "score_ckpt": a.score_ckpt, "classifier_ckpt": a.classifier_ckpt,
           "wrn_depth": a.wrn_depth, "wrn_widen": a.wrn_widen, "subset": a.subset}
    if getattr(a, "ddpm_ckpt", None) is not None:
        out["ddpm_ckpt"] = a.ddpm_ckpt
    return out


def run_toy_cmd(a) -> int:
    r = toy.run_toy(a.out, n_paths=a.n_paths, c_grid=a.c, lam_grid=a.lam, seed=a.seed, progress=a.progress)
    print("label of the purified point, P(x_0 < 0):")
    print(toy.toy_table(r))
    print("path ever below 0, P(min_t x_t < 0) (Prop. 1's flip):")
    print(toy.toy_table(r, "flip_ever"))
    p2 = r["prop2"]
    print(f"exact flip probability (lam = 0): {r['exact_flip_lam0_c0']:.4f}")
    print(f"Prop. 2 (Eq. 8): fraction of paths within the bound, worst cell: global sups "
          f"{p2['min_frac_global']:.4f}, per-path sups {p2['min_frac_per_path']:.4f}")
    print(f"wrote {a.out}/toy.csv, toy.json, toy.png ({r['seconds']:.1f} s)")
    return 0


def run_trajectory_cmd(a) -> int:
    defaults = trajectory.DEFAULTS
    if a.data != "digits":
        defaults = {**defaults, **TRAJECTORY_CIFAR}
    pick = lambda name: defaults[name] if getattr(a, name) is None else getattr(a, name)  # noqa: E731
    s = trajectory.run_trajectory(a.out, data=a.data, n_images=pick("n_images"), seed=a.seed, eps=pick("eps"),
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
    if a.defense == "coup" and a.m_grid is not None:
        raise ValueError("--m-grid: the LM steps axis of --defense coup-lm; --defense coup sweeps t* (--t-grid)")
    if a.defense == "coup-lm" and a.t_grid is not None:
        raise ValueError("--t-grid: the t* axis of --defense coup; --defense coup-lm sweeps M (--m-grid)")
    if a.defense == "coup" and a.ddpm_ckpt is not None:
        raise ValueError("--ddpm-ckpt: the eps-network of --defense coup-lm; --defense coup takes --score-ckpt")
    if a.defense == "coup-lm" and a.score_ckpt is not None:
        raise ValueError("--score-ckpt: --defense coup-lm purifies with a DDPM eps-network, give --ddpm-ckpt")
    cfg = sweep.SweepConfig.preset(a.data, protocol=a.protocol or (), n_images=a.n_images, seed=a.seed, eps=a.eps,
                                   n_iter=a.n_iter, dt=a.dt, t_grid=a.t_grid, lam_grid=a.lam_grid, t_star=a.t_star,
                                   lam=a.lam, engine=a.engine, n_eval=a.n_eval, eot=a.eot, defense=a.defense,
                                   m_grid=a.m_grid, lm_steps=a.lm_steps, attacks=a.attacks, gradient=a.gradient)
    print(f"sweep: robust = {cfg.attack_description()}", flush=True)
    r = sweep.run_sweep(cfg, a.out, device=a.device, progress=a.progress, **_load_kwargs(a))
    pct = lambda row, key, lo, hi: f"{100 * row[key]:5.1f} [{100 * row[lo]:.1f}, {100 * row[hi]:.1f}]"  # noqa: E731
    for row in r["rows"]:
        where = f"M={row['lm_steps']:<3d}" if "lm_steps" in row else f"t*={row['t_star']:<6g}"
        print(f"{row['axis']:>8}  {where} lam={row['lam']:<5g} "
              f"clean Avg {pct(row, 'clean_acc', 'clean_lo', 'clean_hi')}"
              f"  robust Avg {pct(row, 'robust_acc', 'robust_lo', 'robust_hi')}"
              f"  Worst-of-R {pct(row, 'robust_worst', 'robust_worst_lo', 'robust_worst_hi')}")
    print(f"(%, 95 % intervals over images) wrote {a.out}/sweep.csv, sweep.json, sweep.png ({r['seconds']:.1f} s)")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `paper {toy,trajectory,sweep}` to an argparse subparsers object; each sets args.func."""
    paper = subparsers.add_parser("paper", help="the paper's analyses (toy study, trajectories, sweeps)",
                                  description="Sec. 5.3-5.4 of arXiv 2408.05900: " + ", ".join(COMMANDS))
    _common(paper)
    sub = paper.add_subparsers(dest="paper_command", required=True)

    p = sub.add_parser("toy", help="2-Gaussian label-flip probability vs (c, lam) and Prop. 2 (Fig. 3b)")
    _common(p)
    p.add_argument("--n-paths", type=N_PATHS, default=toy.N_PATHS,
                   help=f"Monte-Carlo paths per cell, at most {MAX_PATHS:,} (default {toy.N_PATHS:,})")
    p.add_argument("--c", type=_list_of(WEIGHT), default=toy.C_GRID,
                   help=f"noise weights c of the classifier p(y=1|x) = p1 / (p0 + p1 + c sin(100 x)/100), comma "
                        f"list in [0, {MAX_WEIGHT:g}] (default {','.join(f'{v:g}' for v in toy.C_GRID)})")
    p.add_argument("--lam", type=_list_of(WEIGHT), default=toy.LAM_GRID,
                   help=f"guidance weights, comma list in [0, {MAX_WEIGHT:g}] (default "
                        f"{','.join(f'{v:g}' for v in toy.LAM_GRID)})")
    p.set_defaults(func=_command(run_toy_cmd))

    p = sub.add_parser("trajectory", help="p(y_true|x_t), p(y_adv|x_t) along purification (Fig. 2a)")
    _common(p)
    _data_args(p, trajectory.DEFAULTS, {**trajectory.DEFAULTS, **TRAJECTORY_CIFAR})
    p.add_argument("--t-star", type=T_STAR, default=0.1, help="purification time t* in (0, 1] (default 0.1)")
    p.add_argument("--lam", type=WEIGHT, default=1.0, help="guidance weight of the guided path (default 1)")
    p.set_defaults(func=_command(run_trajectory_cmd))

    p = sub.add_parser("sweep", help="clean / robust accuracy vs t* and vs lam (Fig. 4; APGD-CE by default, the "
                                     "worst case over --attacks or --protocol); --defense coup-lm: vs the LM steps M "
                                     "and lam (Sec. 5.2.1)")
    _common(p)
    _data_args(p, sweep.PRESETS["digits"], sweep.PRESETS["cifar10"])
    p.add_argument("--defense", choices=sweep.DEFENSES, default="coup",
                   help="coup (default: axes t* and lam) or coup-lm (likelihood maximization with guidance, Sec. 5.2.1: "
                        "axes M and lam, lam = 0 being LM without guidance)")
    p.add_argument("--m-grid", type=_list_of(LM_STEPS), default=None,
                   help=f"coup-lm: LM step counts M of the first axis (default {','.join(map(str, sweep.M_GRID))})")
    p.add_argument("--lm-steps", type=LM_STEPS, default=None, help="coup-lm: M on the lam axis (default 5)")
    p.add_argument("--ddpm-ckpt", help="coup-lm on CIFAR: the DDPM eps-network (coup_fast.models.load_ddpm; default "
                                       "none: required there); digits use the shipped score model through "
                                       "coup_fast.lm.index_eps_model")
    grid = lambda values: ",".join(f"{v:g}" for v in values)  # noqa: E731
    p.add_argument("--t-grid", type=_list_of(T_STAR), default=None,
                   help=f"t* values, lam fixed at --lam (default: digits {grid(sweep.PRESETS['digits']['t_grid'])}; "
                        f"CIFAR {grid(sweep.PRESETS['cifar10']['t_grid'])})")
    p.add_argument("--lam-grid", type=_list_of(WEIGHT), default=None,
                   help=f"lam values, t* fixed at --t-star (default: digits "
                        f"{grid(sweep.PRESETS['digits']['lam_grid'])}; "
                        f"CIFAR {grid(sweep.PRESETS['cifar10']['lam_grid'])})")
    p.add_argument("--t-star", type=T_STAR, default=0.1, help="t* of the lam axis (default 0.1)")
    p.add_argument("--lam", type=WEIGHT, default=1.0, help="lam of the t* axis (default 1)")
    p.add_argument("--n-eval", type=POSITIVE_INT, default=None,
                   help="R: purifications of each clean image and each attack candidate (Avg and Worst-of-R with 95 %% "
                        f"intervals over images; default {sweep.SweepConfig.n_eval}, or the protocol's)")
    p.add_argument("--eot", type=POSITIVE_INT, default=None,
                   help=f"EOT draws per APGD-CE gradient (default {sweep.SweepConfig.eot}; AutoAttack-rand uses 20)")
    p.add_argument("--attacks", type=_names(ATTACKS), default=None,
                   help=f"comma list of attacks from {ATTACKS}: robust accuracy is per image the worst over the clean "
                        f"image and these, as coup-fast eval's worst case (default "
                        f"{','.join(sweep.SweepConfig.attacks)}, or the protocol's; the digits eval runs "
                        "apgd-ce,aa-rand,pgd-eot)")
    p.add_argument("--protocol", type=_names(tuple(PROTOCOLS)), default=None,
                   help=f"comma list of the literature's attack budgets {tuple(PROTOCOLS)} (coup_fast.protocols, as "
                        "coup-fast eval --protocol; flags win; default none)")
    p.add_argument("--gradient", choices=ATTACK_GRADIENTS, default="exact",
                   help="the attacker's gradient (purify's gradient; default exact, the discrete adjoint)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="purify's engine (default auto: CUDA graphs on a GPU, eager on a CPU; 'compile': "
                        "torch.compile'd steps, lam and t* changes do not recompile)")
    p.set_defaults(func=_command(run_sweep_cmd))
    return paper


def _command(fn):
    """fn(a) after the common defaults, the --out check and --threads; bad input -> exit status 2."""
    def run(a):
        for name, value in COMMON_DEFAULTS.items():
            if not hasattr(a, name):
                setattr(a, name, value)
        outputs = {"toy": toy.OUTPUT_FILES, "trajectory": trajectory.OUTPUT_FILES, "sweep": sweep.OUTPUT_FILES}
        try:
            # before any compute: a study that cannot be saved is not worth running
            check_out_dir(a.out, outputs[a.paper_command], arg="--out")
            if a.threads:
                torch.set_num_threads(a.threads)
            return fn(a)
        except (ValueError, OSError) as e:  # OSError: FileNotFoundError of a missing checkpoint, a full disk
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

"""EOT attacks on CPU: sequential purify calls against one batched call, side by side.

    python benchmarks/bench_eot.py [--quick] [--threads 1] [--batch 32] [--eot 20] [--iters 2] [--out FILE.json]

Models: the digits score net and classifier (coup_fast.models; random weights of the same architecture when the
trained ones are absent: speed does not depend on them).  COUP at t* = 0.1, dt = 0.02 (N = 5, the digits eval
preset), lam = 1, B images and K EOT draws per gradient (default B = 32, K = 20).  Each attack runs `iters`
iterations two ways in one process, interleaved (the fastest of `repeats` rounds after a warm-up round):

* sequential: K purify calls of B images per gradient (AttackSettings.eot_chunk = 1; pyautoattack's own loop);
* batched: one call of K x B images (coup_fast.attacks' default; for pyautoattack, BatchedEOT serving its loop).

  pgd-eot   PGD with the exact gradient (coup_fast.attacks.pgd_eot_candidates)
  bpda-eot  PGD with BPDA's straight-through gradient
  apgd-eot  pyautoattack's APGD-CE with eot_iter = K (attack_single_run), as AutoAttack 'rand' runs it

Both ways draw the same noise (the same K seeds in order), so they return the same adversarial images up to
round-off: the benchmark prints the largest difference.  --quick (CI): B = 4, K = 4, one iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: the shared harness beside it
import _harness  # noqa: E402

from coup_fast import PurifiedClassifier  # noqa: E402
from coup_fast.attacks import BatchedEOT, bpda_eot_candidates, pgd_eot_candidates  # noqa: E402
from coup_fast.models import digits  # noqa: E402

ATTACKS = ("pgd-eot", "bpda-eot", "apgd-eot")


def _models():
    try:
        score, clf = digits.load_digits_models()
        return score, clf, "trained digits weights"
    except (FileNotFoundError, ImportError, OSError, ValueError):
        from coup_fast.score import EpsilonScore

        torch.manual_seed(0)
        score, clf = EpsilonScore(digits.DigitsEpsNet()).eval(), digits.DigitsClassifier().eval()
        for p in list(score.parameters()) + list(clf.parameters()):
            p.requires_grad_(False)
        return score, clf, "random weights, digits architecture"


def _attack(name: str, model, x, y, eot: int, iters: int, batched: bool):
    """One attack run; returns its final adversarial batch."""
    chunk = None if batched else 1
    if name == "pgd-eot":
        return pgd_eot_candidates(model, x, y, eps=0.15, n_iter=iters, eot=eot, chunk=chunk)["final"]
    if name == "bpda-eot":
        return bpda_eot_candidates(model, x, y, eps=0.15, n_iter=iters, eot=eot, chunk=chunk)["final"]
    from pyautoattack.autopgd_base import APGDAttack

    served = BatchedEOT(model, eot) if batched else model
    attack = APGDAttack(served, n_iter=iters, eps=0.15, norm="Linf", eot_iter=eot, seed=0, device=x.device)
    attack.init_hyperparam(x)
    return attack.attack_single_run(x.clone(), y.clone())[3]


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    score, clf, source = _models()
    model = PurifiedClassifier(score, clf, t_star=0.1, dt=0.02, lam=1.0, mode="coup", engine="eager")
    from coup_fast.data import load_digits

    x, y = load_digits("test", n=args.batch, seed=0)
    print(f"device: {_harness.device_name('cpu')}")
    print(f"models: {source}; COUP t* = 0.1, dt = 0.02 (N = 5), lam = 1; B = {args.batch}, EOT K = {args.eot}, "
          f"{args.iters} iteration(s) per attack; fastest of {args.repeats} interleaved round(s) after a warm-up")
    rows = []
    for name in args.attacks:
        outputs = {}

        def run(batched, name=name):
            torch.manual_seed(0)
            outputs[batched] = _attack(name, model, x, y, args.eot, args.iters, batched)

        best = _harness.time_round_robin({"sequential": lambda: run(False), "batched": lambda: run(True)},
                                         repeats=args.repeats)
        diff = float((outputs[True] - outputs[False]).detach().abs().max())
        rows.append({"attack": name, "sequential_s": best["sequential"], "batched_s": best["batched"],
                     "speedup": best["sequential"] / best["batched"], "max_abs_diff": diff})
    print(_harness.table(rows, [("attack", "attack"), ("sequential_s", "sequential s"), ("batched_s", "batched s"),
                                ("speedup", "x faster"), ("max_abs_diff", "max |adv diff|")]))
    report = {"device": _harness.device_name("cpu"), "threads": args.threads, "source": source,
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B = 4, K = 4, one iteration, one round (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="images per attack batch B (default 32)")
    parser.add_argument("--eot", type=int, default=20, help="EOT draws per gradient K (default 20)")
    parser.add_argument("--iters", type=int, default=2, help="attack iterations (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round (default 2)")
    parser.add_argument("--attacks", type=lambda s: tuple(s.split(",")), default=ATTACKS,
                        help=f"comma list of {ATTACKS}")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.eot, args.iters, args.repeats = 4, 4, 1, 1
    bad = [a for a in args.attacks if a not in ATTACKS]
    if bad:
        parser.error(f"--attacks: unknown {bad[0]!r}; expected some of {ATTACKS}")
    return args


if __name__ == "__main__":
    main(parse())

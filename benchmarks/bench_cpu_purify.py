"""COUP on the CPU: coup_fast vs torchsde, side by side, with peak memory.

    python -m benchmarks.bench_cpu_purify [--quick] [--threads 1]

Models: the digits score net (1x8x8, ~0.1M params) and classifier (coup_fast.models); random
weights of the same architecture when the trained weights are absent (speed does not depend on
them).  Guided COUP (lam = 1), t* = 0.1 (N = 100 steps of dt = 1e-3).

* purification, images/s: `purify` (no grad) vs torchsde `sdeint` (Euler, BrownianInterval), and
  "networks": the N eager score and guidance calls alone, the floor no engine can beat without
  changing how the networks execute (engine='compile' changes it); and "convolutions": only the
  convolution kernels (forward, and the guidance's backward) of those calls, replayed: the floor for
  any engine that keeps torch's (oneDNN's) convolutions.
* image gradients/s, d<w, purify(x)>/dx: gradient='exact' (discrete adjoint; memory='lean', 'fast' and
  the default, 'auto': step graphs kept while they fit a quarter of free memory) vs DiffPure-style
  `sdeint_adjoint` (score-net parameters trainable, hence adjoint parameters: adjoint_params=None)
  and a tuned `sdeint_adjoint` (adjoint_params=()).
* engine='compile': the same purification and exact gradients with the step's network calls
  compiled (coup_fast.compiled); compilation happens in the uncounted warm-up round.
* peak memory: in a fresh child process, the peak RSS during one call minus the RSS before it (the
  peak mark reset first, see _harness.py), after a one-step call at B = 1 (at the measured B for the
  compiled engine) has done the libraries' one-time set-up; and a table over N for the exact
  gradient against plain autograd through the loop.  --quick leaves the compiled engine out.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks import _harness as H
from coup_fast import purify
from coup_fast.networks import drift_terms  # internal: one step's network calls (the networks' floor)
from coup_fast.reference import T_END, brownian_interval, purify_unrolled, solve_published, solve_torchsde
from coup_fast.sde import ReverseGrid
from coup_fast.solver import PurifyConfig

METHODS = ("purify", "purify-compiled", "torchsde", "networks", "convolutions", "exact", "exact-fast", "exact-default",
           "exact-compiled", "exact-compiled-fast", "diffpure-adjoint", "tuned-adjoint", "unrolled")
LAM = 1.0


def _models(kind: str = "digits"):
    if kind == "analytic":  # closed-form score and classifier: what is left is the engine's own per-step cost
        from coup_fast.analytic import GaussianMixture, LinearSoftmaxClassifier

        g = torch.Generator().manual_seed(0)
        gmm = GaussianMixture(0.5 * torch.randn(3, 64, generator=g, dtype=torch.float64), [0.3, 0.4, 0.5])
        clf = LinearSoftmaxClassifier(torch.randn(10, 64, generator=g, dtype=torch.float64))
        return gmm.float(), clf.float(), "analytic (Gaussian mixture score, linear-softmax classifier), d = 64"
    from coup_fast.models import digits

    try:
        score, clf = digits.load_digits_models()
        source = "trained digits weights"
    except (FileNotFoundError, ImportError, OSError):
        from coup_fast.score import score_sde_continuous

        torch.manual_seed(0)
        score, clf = score_sde_continuous(digits.DigitsEpsNet()).eval(), digits.DigitsClassifier().eval()
        source = "random weights, digits architecture"
    for p in list(score.parameters()) + list(clf.parameters()):
        p.requires_grad_(False)
    return score, clf, source


def _case_fn(method: str, batch: int, t_star: float, models: str = "digits"):
    """(setup description, fn) for one measured call."""

    score, clf, source = _models(models)
    g = torch.Generator().manual_seed(0)
    shape = (batch, 64) if models == "analytic" else (batch, 1, 8, 8)
    x, w = torch.rand(shape, generator=g), torch.randn(shape, generator=g)
    kw = dict(t_star=t_star, lam=LAM, mode="coup")
    setting = PurifyConfig(ReverseGrid.from_dt(t_star, 1e-3), LAM, "coup")

    def torchsde_run(adjoint, adjoint_params=None):  # sdeint, or the published attack's sdeint_adjoint
        state = (2 * x - 1).requires_grad_(adjoint)
        if not adjoint:
            return solve_torchsde(state, score, clf, setting, bm=brownian_interval(state, t_star))
        out = solve_published(state, score, clf, setting, bm=brownian_interval(state, t_star, t_end=T_END),
                              adjoint_params=adjoint_params)
        return torch.autograd.grad(out, state, w)[0]

    if method in ("purify", "purify-compiled"):
        engine = "compile" if method == "purify-compiled" else "auto"

        def fn():
            with torch.no_grad():
                return purify(x, score, clf, engine=engine, **kw)
    elif method == "networks":  # the eager networks' calls of a guided solve and nothing else
        def fn():
            with torch.no_grad():
                state = 2 * x - 1
                for k in range(setting.grid.n_steps):
                    drift_terms(state, setting.grid.t(k), score, clf, LAM)
    elif method == "convolutions":  # only the convolution kernels of those calls, replayed
        with torch.no_grad():  # as in "networks" (the guidance turns grad on for its backward)
            calls = H.recorded_convolutions(lambda: drift_terms(2 * x - 1, setting.grid.t(0), score, clf, LAM))

        def fn():
            with torch.no_grad():
                for _ in range(setting.grid.n_steps):
                    H.replay(calls)
    elif method == "torchsde":
        def fn():
            with torch.no_grad():
                return torchsde_run(False)
    elif method in ("exact", "exact-fast", "exact-default", "exact-compiled", "exact-compiled-fast", "unrolled"):
        run = purify_unrolled if method == "unrolled" else purify
        extra = {"exact": {"memory": "lean"}, "exact-fast": {"memory": "fast"}, "exact-default": {},
                 "exact-compiled": {"engine": "compile", "memory": "lean"},
                 "exact-compiled-fast": {"engine": "compile", "memory": "fast"}}.get(method, {})

        def fn():
            xr = x.clone().requires_grad_(True)
            return torch.autograd.grad(run(xr, score, clf, **kw, **extra), xr, w)[0]
    elif method == "diffpure-adjoint":
        for p in score.parameters():  # DiffPure's score net is an nn.Module with trainable weights
            p.requires_grad_(True)

        def fn():
            return torchsde_run(True)
    elif method == "tuned-adjoint":
        def fn():
            return torchsde_run(True, adjoint_params=())
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return source, fn


def run_case(case: dict) -> dict:
    """Peak memory of one method (case['method']), or round-robin timings of several (case['methods'])."""
    torch.set_num_threads(case["threads"])
    models = case.get("models", "digits")
    if "method" in case:
        # One step: the libraries' one-time set-up, not counted.  At B = 1, except for the compiled
        # engine, whose one-time set-up (compiling for this batch shape) needs the measured batch.
        warm_batch = case["batch"] if "compiled" in case["method"] else 1
        _case_fn(case["method"], warm_batch, 1e-3, models)[1]()
        source, fn = _case_fn(case["method"], case["batch"], case["t_star"], models)
        return {"peak_mib": H.peak_growth(fn) / 2**20, "source": source}
    # Timing: all methods in one process, interleaved A B C A B C ..., fastest run each: on a
    # shared machine the load drifts over minutes, and interleaving exposes every method to it alike.
    fns = {m: _case_fn(m, case["batch"], case["t_star"], models) for m in case["methods"]}
    seconds = H.time_round_robin({m: fn for m, (_, fn) in fns.items()}, repeats=case["repeats"])
    return {"seconds": seconds, "source": next(iter(fns.values()))[0], "device": H.device_name("cpu")}


def main(args):
    base = {"threads": args.threads}
    repeats = 1 if args.quick else 2
    t_star = 0.02 if args.quick else 0.1
    batches = [1, 8] if args.quick else [1, 64]
    child = "benchmarks.bench_cpu_purify"

    def timed(methods, batch, models="digits"):
        case = {**base, "methods": methods, "batch": batch, "t_star": t_star, "repeats": repeats, "models": models}
        return H.run_child(child, case)

    def peak(method, batch, t, models="digits"):
        case = {**base, "method": method, "batch": batch, "t_star": t, "models": models}
        return H.run_child(child, case)["peak_mib"]

    rows, info = [], None
    compiled = () if args.quick else ("purify-compiled", "exact-compiled", "exact-compiled-fast")  # minutes to compile
    methods = ("purify", "torchsde", "exact", "exact-fast", "exact-default", "diffpure-adjoint", "tuned-adjoint") + compiled
    for batch in batches:
        info = timed(methods + ("networks", "convolutions"), batch)
        sec = info["seconds"]
        sec = {**dict.fromkeys(("purify-compiled", "exact-compiled", "exact-compiled-fast"), float("nan")), **sec}
        rows.append({
            "batch": batch,
            "pur_purify": batch / sec["purify"], "pur_torchsde": batch / sec["torchsde"],
            "pur_x": sec["torchsde"] / sec["purify"], "pur_ceiling": sec["torchsde"] / sec["networks"],
            "pur_conv_ceiling": sec["torchsde"] / sec["convolutions"],
            "grad_exact": batch / sec["exact"], "grad_diffpure": batch / sec["diffpure-adjoint"],
            "grad_tuned": batch / sec["tuned-adjoint"],
            "x_diffpure": sec["diffpure-adjoint"] / sec["exact"], "x_tuned": sec["tuned-adjoint"] / sec["exact"],
            "grad_fast": batch / sec["exact-fast"], "xf_diffpure": sec["diffpure-adjoint"] / sec["exact-fast"],
            "grad_default": batch / sec["exact-default"], "xd_diffpure": sec["diffpure-adjoint"] / sec["exact-default"],
            "xd_lean": sec["exact"] / sec["exact-default"],
            "pur_compiled": batch / sec["purify-compiled"], "pur_cx": sec["torchsde"] / sec["purify-compiled"],
            "grad_compiled": batch / sec["exact-compiled"], "xc_diffpure": sec["diffpure-adjoint"] / sec["exact-compiled"],
            "grad_cfast": batch / sec["exact-compiled-fast"],
            "xcf_diffpure": sec["diffpure-adjoint"] / sec["exact-compiled-fast"],
            **{f"mem_{m}": peak(m, batch, t_star) for m in methods},
        })
    print(f"device: {info['device']}; models: {info['source']}; t* = {t_star}, lam = {LAM}, mode coup")
    print(f"\nthroughput (images/s, fastest of {repeats} interleaved runs; x = speed-up of coup_fast)")
    print(H.table(rows, [("batch", "B"), ("pur_purify", "purify"), ("pur_torchsde", "sdeint"), ("pur_x", "x"),
                         ("pur_ceiling", "x ceiling"), ("pur_conv_ceiling", "x conv ceiling"), ("grad_exact", "exact grad"), ("grad_diffpure", "DiffPure adj"), ("x_diffpure", "x"),
                         ("grad_tuned", "tuned adj"), ("x_tuned", "x"), ("grad_fast", "exact grad fast"),
                         ("xf_diffpure", "x DiffPure"), ("grad_default", "exact grad default"),
                         ("xd_diffpure", "x DiffPure"), ("xd_lean", "x lean")]))
    print("x ceiling = sdeint / (the networks' calls alone): the most any engine can gain without touching the networks")
    print("x conv ceiling = sdeint / (their convolution kernels alone, replayed): the most any engine that runs the "
          "same convolution kernels can gain")
    print("exact grad = memory='lean' (recompute per step); exact grad fast = memory='fast' (keep step graphs); exact grad "
          "default = memory='auto' (keep step graphs within a quarter of free memory; bitwise lean's gradient)")
    if compiled:
        print("\nengine='compile' (networks, guidance and Hessian-vector products as torch.compile'd functions; "
              "compile time not counted: it is the warm-up round)")
        print(H.table(rows, [("batch", "B"), ("pur_compiled", "purify"), ("pur_cx", "x sdeint"),
                             ("grad_compiled", "exact grad"), ("xc_diffpure", "x DiffPure"),
                             ("grad_cfast", "exact grad fast"), ("xcf_diffpure", "x DiffPure")]))
    print("\npeak RSS growth of one call (MiB; peak during the call minus resident before it)")
    print(H.table(rows, [("batch", "B"), ("mem_purify", "purify"), ("mem_torchsde", "sdeint"),
                         ("mem_exact", "exact grad"), ("mem_exact-fast", "exact fast"),
                         ("mem_exact-default", "exact default"),
                         ("mem_exact-compiled", "compiled"), ("mem_exact-compiled-fast", "compiled fast"),
                         ("mem_diffpure-adjoint", "DiffPure adj"),
                         ("mem_tuned-adjoint", "tuned adj")]))

    sec = timed(("purify", "torchsde", "exact", "tuned-adjoint"), 1, models="analytic")["seconds"]
    print("\nengine overhead: B = 1 with closed-form models (a few dozen small tensor ops, no networks), d = 64; images/s")
    print(H.table([{"pur_purify": 1 / sec["purify"], "pur_torchsde": 1 / sec["torchsde"],
                    "pur_x": sec["torchsde"] / sec["purify"], "grad_exact": 1 / sec["exact"],
                    "grad_tuned": 1 / sec["tuned-adjoint"], "x_tuned": sec["tuned-adjoint"] / sec["exact"]}],
                  [("pur_purify", "purify"), ("pur_torchsde", "sdeint"), ("pur_x", "x"), ("grad_exact", "exact grad"),
                   ("grad_tuned", "sdeint_adjoint"), ("x_tuned", "x")]))

    batch = batches[-1]
    mem_rows = []
    for t in ([0.01, 0.02] if args.quick else [0.025, 0.05, 0.1, 0.2]):
        n = round(t / 1e-3)
        mem_rows.append({"t": t, "N": n, "traj": n * batch * 64 * 4 / 2**20, "exact": peak("exact", batch, t),
                         "default": peak("exact-default", batch, t), "unrolled": peak("unrolled", batch, t)})
    print(f"\npeak RSS growth of the exact gradient over N (B = {batch}, d = 64, float32; MiB)")
    print("N.B.d = the kept trajectory x_0..x_{N-1}; the rest is one step's recomputed graph + allocator slack")
    print(H.table(mem_rows, [("t", "t*"), ("N", "N"), ("traj", "N.B.d"), ("exact", "exact, lean"),
                             ("default", "exact, default"), ("unrolled", "unrolled autograd")]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI size: t* = 0.02, batches 1 and 8, one repeat, no compiled engine")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each measured process (pinned)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.case:
        print(json.dumps(run_case(json.loads(ns.case))))
    else:
        main(ns)

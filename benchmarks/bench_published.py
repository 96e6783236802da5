"""The published attack's gradient (gradient='adjoint') on coup_fast's solver against torchsde, side by side.

    python -m benchmarks.bench_published [--threads 1] [--batch 32] [--dt 1e-3]             # CPU, digits
    python -m benchmarks.bench_published --arch cifar --device cuda --batch 64 --dt 1e-2   # gpu_session.sh published

COUP, lam = 1, t* = 0.1 (N = t*/dt steps), one input gradient of the cross-entropy of classifier(purify(x)).
Rows, timed interleaved (fastest of --repeats rounds after a warm-up round that captures / compiles):

- published-fast: purify(gradient='adjoint', engine='auto'): eager on a CPU, the CUDA-graph engine on a GPU,
  under --knob (default fp32 on a CPU, tf32 on CUDA).
- published-torchsde: purify(gradient='adjoint', engine='torchsde'): torchsde's sdeint_adjoint, fp32, on the
  same Brownian path (the call's Philox path): its gradient is the fast row's to round-off (printed).
- published-official: coup_fast.reference.purify_published: torchsde on a BrownianInterval, weights frozen
  (the computation the paper's code runs, with the input gradient only).
- exact: the default gradient (the discrete adjoint, memory='auto') on the fast row's engine and knob.
- published-compile (only when asked, --rows): purify(gradient='adjoint', engine='compile'); its warm-up round
  compiles (tens of seconds on a CPU).

Wall time and, beside it, the process's CPU time (on a shared machine with one thread, the less disturbed
measure).  Peak memory of one call: the resident-set growth on a CPU, torch's allocator on CUDA
(benchmarks/_harness.py).
Threads are pinned (--threads, default 1).  Never assert on these numbers in tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks import _harness as H
from benchmarks.bench_attacks import load_models
import coup_fast
from coup_fast import purify
from coup_fast.noise import draw_seed
from coup_fast.precision import Precision, precision_context
from coup_fast.reference import purify_published

LAM = 1.0
ROWS = ("published-fast", "published-torchsde", "published-official", "exact")
OPTIONAL_ROWS = ("published-compile",)


def row_functions(score, clf, x, y, args) -> dict:
    """{row: fn() -> input gradient}; every coup_fast row draws the same seed on every call."""
    kw = dict(t_star=args.t_star, dt=args.dt, lam=LAM)
    seed = draw_seed(torch.Generator().manual_seed(1000 + x.shape[0]))
    knob = Precision(args.knob)

    def grad_of(purified):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(clf(purified(xr)), y), xr)
        return grad

    def coup(gradient, engine, under_knob):
        def fn():
            gen = torch.Generator().manual_seed(seed)  # the same seed drawn on every call: the same noise
            with precision_context(knob if under_knob else Precision(), x.device.type):
                return grad_of(lambda v: purify(v, score, clf, gradient=gradient, engine=engine, generator=gen, **kw))
        return fn

    def official():
        return grad_of(lambda v: purify_published(v, score, clf, seed=seed % 2**31, **kw))

    return {"published-fast": coup("adjoint", "auto", True), "published-torchsde": coup("adjoint", "torchsde", False),
            "published-official": official, "exact": coup("exact", "auto", True),
            "published-compile": coup("adjoint", "compile", True)}


def time_rows(fns: dict, repeats: int, device) -> tuple[dict, dict, dict]:
    """(wall s, CPU s, first call's wall s) of each fn, interleaved: a warm-up round, then `repeats` rounds, the fastest
    kept.  The process's CPU time beside the wall time: with one thread on a shared machine it is the less disturbed
    measure (on CUDA, wall time only means anything)."""
    wall, cpu, first = ({name: float("inf") for name in fns} for _ in range(3))
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            H.sync(device.type)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            H.sync(device.type)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if round_:
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
            else:
                first[name] = w
    return wall, cpu, first


def _peak_mib(fn, device) -> float:
    if device.type == "cuda":
        return H.cuda_peak_growth(fn) / 2**20
    return H.peak_growth(fn, trim=True) / 2**20


def run(args) -> list[dict]:
    score, clf, shape, desc = load_models(args.arch, args.device)
    gen = torch.Generator().manual_seed(args.batch)
    x = torch.rand(args.batch, *shape, generator=gen).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
    fns = {name: fn for name, fn in row_functions(score, clf, x, y, args).items() if name in args.rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, cpu_seconds, first = time_rows(fns, args.repeats, args.device)
        grads = {name: fn() for name, fn in fns.items()}
        peaks = {name: _peak_mib(fn, args.device) for name, fn in fns.items()} if args.memory else {}
    ref = grads.get("published-torchsde")
    rows = []
    for name in fns:
        g = grads[name]
        same_path = ref is not None and name.startswith("published") and name != "published-official"  # one path
        rows.append({
            "row": name, "batch": args.batch, "seconds": seconds[name], "cpu_seconds": cpu_seconds[name],
            "img_grad_per_s": args.batch / seconds[name],
            "first_call_s": first[name], "peak_mib": peaks.get(name),
            "x_torchsde": seconds["published-torchsde"] / seconds[name] if "published-torchsde" in seconds else None,
            "vs_exact": seconds[name] / seconds["exact"] if "exact" in seconds else None,
            "cpu_vs_exact": cpu_seconds[name] / cpu_seconds["exact"] if "exact" in seconds else None,
            "max_rel_torchsde": float((g - ref).abs().max() / ref.abs().max()) if same_path else None,
            "cos_torchsde": float(F.cosine_similarity(g.flatten(), ref.flatten(), dim=0)) if same_path else None,
        })
    return rows, desc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("digits", "cifar"), default="digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned; printed)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default 32 digits, 64 cifar)")
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--knob", choices=("fp32", "tf32", "bf16"), default=None,
                   help="precision of the fast and exact rows (default fp32 on a CPU, tf32 on CUDA); torchsde: fp32")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated from {ROWS + OPTIONAL_ROWS}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round (fastest kept)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory calls")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.batch = args.batch or (64 if args.arch == "cifar" else 32)
    args.knob = args.knob or ("tf32" if args.device.type == "cuda" else "fp32")
    args.rows = args.rows.split(",")
    bad = [r for r in args.rows if r not in ROWS + OPTIONAL_ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; expected some of {list(ROWS + OPTIONAL_ROWS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    n_steps = max(1, round(args.t_star / args.dt))
    device = H.device_name(str(args.device))
    rows, desc = run(args)
    print(f"device: {device}; torch {torch.__version__}; ops {coup_fast.backend_info()['cpu']}; models: {desc}")
    print(f"published attack gradient, COUP lam = {LAM}, t* = {args.t_star}, dt = {args.dt} (N = {n_steps}), "
          f"B = {args.batch}; fast and exact rows {args.knob}, torchsde fp32")
    print(H.table(rows, [("row", "row"), ("seconds", "s"), ("cpu_seconds", "CPU s"), ("first_call_s", "1st call s"),
                         ("img_grad_per_s", "img-grad/s"), ("peak_mib", "peak MiB"), ("x_torchsde", "x torchsde"),
                         ("vs_exact", "time / exact"), ("cpu_vs_exact", "CPU time / exact"),
                         ("max_rel_torchsde", "max rel vs torchsde"),
                         ("cos_torchsde", "cos vs torchsde")]))
    report = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "models": desc,
              "config": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"JSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)

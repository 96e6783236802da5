"""Throughput of COUP purification and of its exact gradient: torchsde reference vs coup_fast engines.

    python benchmarks/throughput.py                    # embedded digits models, on this machine's device
    python benchmarks/throughput.py --arch cifar       # NCSN++ deep cont. + WRN-28-10 shapes, random weights
    python benchmarks/throughput.py --score-ckpt checkpoint_8.pth --classifier-ckpt Standard.pt
    python benchmarks/throughput.py --quick --out quick.json   # tiny (CI): well under a minute on a CPU

Rows, side by side for each batch size:
- torchsde:        sdeint (purification) and sdeint_adjoint with the score network's parameters trainable
                   adjoint parameters (DiffPure's configuration; their gradients are computed too);
- torchsde-frozen: sdeint_adjoint with adjoint_params=() (frozen networks, the tuned reference);
- eager / graph:   coup_fast's eager engine and its CUDA-graph engine (CUDA only), per precision knob
                   (fp32 / tf32 / bf16 networks, channels_last, optional torch.compile; state and adjoint fp32).
Rates are purified images/s and image-gradients/s (x.grad of <v, purify(x)>, the exact discrete adjoint
for coup_fast, torchsde's continuous adjoint for the reference).  FLOPs are matmul/conv FLOPs of
the networks, counted once per model with torch.utils.flop_counter.FlopCounterMode; %peak divides the
achieved rate of those useful FLOPs by the device's dense peak for the row's arithmetic.  A second
table gives the error each knob and engine introduces against the fp32 eager engine, same noise.
MiB: peak memory of a row's calls, on CUDA only (torch's allocator); None on a CPU, where one process's
resident set depends on the rows run before (see `measure`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import coup_fast
from coup_fast import clear_caches, purify
from coup_fast.networks import adjoint_vjp, drift_terms  # internal: one step's network calls (FLOPs, warm-up)
from coup_fast.noise import draw_seed, philox_normal
from coup_fast.precision import Precision, precision_context, prepare
from coup_fast.reference import brownian_interval, purify_published, purify_torchsde
from coup_fast.score import score_sde_continuous
from coup_fast.sde import ReverseGrid
from coup_fast.solver import PurifyConfig

ARCHES = ("digits", "cifar", "cifar-small")
ENGINES = ("torchsde", "eager", "graph", "compile")
DEFAULT_ENGINES = ("torchsde", "eager", "graph")  # 'compile' costs 20-90 s of compilation per row and batch
KNOBS = {  # name -> Precision
    "fp32": Precision("fp32"),
    "tf32": Precision("tf32"),
    "bf16": Precision("bf16"),
    "fp32+cl": Precision("fp32", channels_last=True),
    "bf16+cl": Precision("bf16", channels_last=True),
    "bf16+compile": Precision("bf16", compile_networks=True),
}
GPU_BATCHES, CPU_BATCHES, QUICK_BATCHES = (1, 8, 64, 512), (1, 8, 32), (1, 4)
GPU_KNOBS, CPU_KNOBS, QUICK_KNOBS = ("fp32", "tf32", "bf16", "bf16+cl"), ("fp32", "bf16", "fp32+cl"), ("fp32", "bf16")
# Dense peak TFLOP/s (NVIDIA datasheets, no sparsity): fp32 (CUDA cores), tf32, bf16 (tensor cores).
PEAK_TFLOPS = {"H100 PCIe": (51.2, 378.0, 756.0), "H100": (66.9, 494.7, 989.4), "H200": (66.9, 494.7, 989.4),
               "A100": (19.5, 156.0, 312.0)}
ERROR_SEED = 1234


def device_peak(name: str):
    """(fp32, tf32, bf16) dense TFLOP/s for a device name, or None ('n/a')."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # 'H100 PCIe' before 'H100'
        if all(part in name for part in key.split()):
            return dict(zip(("fp32", "tf32", "bf16"), PEAK_TFLOPS[key]))
    return None


# ----------------------------------------------------------------------------------- models
def load_models(args, device):
    """(score_model, classifier, image shape (C, H, W), description); parameters frozen, eval mode."""
    from coup_fast import models

    if args.score_ckpt or args.classifier_ckpt or args.arch in ("cifar", "cifar-small"):
        from coup_fast.models.ncsnpp import NCSNpp, load_ncsnpp, ncsnpp_cifar10_deep, ncsnpp_small
        from coup_fast.models.wideresnet import WideResNet, load_wideresnet

        small = args.arch == "cifar-small" and not args.score_ckpt
        if args.score_ckpt:
            score, sdesc = load_ncsnpp(args.score_ckpt, device=device), f"NCSN++ {args.score_ckpt}"
        else:
            config = ncsnpp_small() if small else ncsnpp_cifar10_deep()
            score = score_sde_continuous(NCSNpp(config))
            sdesc = f"NCSN++ {'small' if small else 'deep cont.'} (random weights)"
        if args.classifier_ckpt:
            clf, cdesc = load_wideresnet(args.classifier_ckpt, device=device), f"WRN-28-10 {args.classifier_ckpt}"
        else:
            depth, widen = (16, 2) if small else (28, 10)
            clf, cdesc = WideResNet(depth, widen), f"WRN-{depth}-{widen} (random weights)"
        shape = (3, 32, 32)
    else:
        try:
            score, clf = models.load_digits_models(device)
            sdesc, cdesc = "digits eps-net (shipped)", "digits CNN (shipped)"
        except FileNotFoundError:  # weights not trained yet: the same architectures, random weights
            torch.manual_seed(0)
            score, clf = score_sde_continuous(models.DigitsEpsNet()), models.DigitsClassifier()
            sdesc, cdesc = "digits eps-net (random weights)", "digits CNN (random weights)"
        shape = (1, 8, 8)
    for m in (score, clf):
        m.to(device).eval().requires_grad_(False)
    return score, clf, shape, f"{sdesc} + {cdesc}"


def count_flops(score, clf, shape, setting, device) -> dict:
    """Matmul/conv FLOPs per image: each network's forward, one guided step, one adjoint step."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, *shape, device=device) * 2 - 1
    t = setting.grid.t(0)

    def flops(fn):
        try:
            with FlopCounterMode(display=False) as mode:
                fn()
            return mode.get_total_flops()
        except RuntimeError:  # its module tracker's hooks reject autograd.grad(create_graph=True)
            with _RegistryFlops() as mode:
                fn()
            return mode.total

    out = {
        "score_forward": flops(lambda: score(x, torch.full((1,), t, device=device))),
        "classifier_forward": flops(lambda: clf((x + 1) / 2)),
        "guided_step": flops(lambda: drift_terms(x, t, score, clf, setting.lam)),
        "adjoint_step": flops(lambda: adjoint_vjp(x, torch.randn_like(x), t, score, clf, setting.lam, True)),
    }
    n = setting.grid.n_steps
    out["purify_per_image"] = n * out["guided_step"]
    out["gradient_per_image"] = n * (out["guided_step"] + out["adjoint_step"])  # forward solve + adjoint
    return out


class _RegistryFlops(TorchDispatchMode):
    """FlopCounterMode's per-op formulas without its module tracker (which double backward trips)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


# ----------------------------------------------------------------------------------- measuring
def measure(fn, device, repeat: int, budget_s: float, reuse_warmup: bool = True) -> dict:
    """Run fn once (warm-up: captures, autotuning) then up to `repeat` timed calls; median seconds, peak MiB.

    A warm-up slower than `budget_s` is itself the measurement when `reuse_warmup` (slow reference rows).
    Peak MiB on CUDA only (torch's allocator counts what each row allocates); on a CPU it is None: one process's
    resident set reuses the pages earlier rows freed, so a row's growth would depend on the rows before it
    (bench_cpu_purify and bench_attacks measure single calls' CPU peaks)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        fn()
        sync()
        warm = time.perf_counter() - start
        times = [warm] if reuse_warmup and warm > budget_s else []
        while len(times) < repeat and (not times or sum(times) < budget_s):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    notes = sorted({str(w.message).split(";")[0] for w in caught if "coup_fast" in str(w.message)})
    if times == [warm] and reuse_warmup and warm > budget_s:
        notes.append("one call, incl. warm-up")
    return {"seconds": statistics.median(times), "peak_mib": mib, "notes": notes}


# ----------------------------------------------------------------------------------- providers
class _Trainable:
    """DiffPure's configuration: the score network's parameters are trainable adjoint parameters
    (the classifier is not part of DiffPure's SDE; here it only guides, with frozen weights)."""

    def __init__(self, *nets):
        self.params = [p for n in nets for p in n.parameters()]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None


def providers(args, score, clf, device):
    """(name, knob, purify_fn(x, gen, noise) or None, gradient_fn(x, v, gen, noise) or None, Precision)."""
    kw = dict(t_star=args.t_star, lam=args.lam, dt=args.dt)

    def reference(adjoint_params):  # the published attack (DiffPure's / COUP's sdeint_adjoint)
        def run(x, gen, noise):
            return purify_published(x, score, clf, noise=noise, seed=draw_seed(gen) % 2**31,
                                    adjoint_params=adjoint_params, **kw)
        return run

    def ref_purify(x, gen, noise):
        bm = None if noise is not None else brownian_interval(x, args.t_star, seed=draw_seed(gen) % 2**31)
        with torch.no_grad():
            return purify_torchsde(x, score, clf, noise=noise, bm=bm, **kw)

    rows = []
    if "torchsde" in args.engines:
        fp32 = KNOBS["fp32"]
        rows.append(("torchsde", "fp32", ref_purify, _grad(reference(None), _Trainable(score)), fp32))
        rows.append(("torchsde-frozen", "fp32", None, _grad(reference(()), None), fp32))
    for engine in ("eager", "graph", "compile"):
        if engine not in args.engines:
            continue
        if engine == "graph" and device.type != "cuda":
            continue
        for knob in args.knobs:
            prec = KNOBS[knob]
            if engine == "compile" and prec.compile_networks:  # the engine compiles the whole step itself
                continue
            s, c = prepare(score, prec), prepare(clf, prec)

            def run(x, gen, noise, s=s, c=c, engine=engine):
                return purify(x, s, c, generator=gen, engine=engine, **kw)

            # no double backward through compiled nets; engine='compile' differentiates inside the compiled step
            with_grad = not (prec.compile_networks and args.lam > 0)
            rows.append((engine, knob, _no_grad(run), _grad(run, None) if with_grad else None, prec))
    return rows


def _no_grad(run):
    def purify_fn(x, gen, noise=None):
        with torch.no_grad():
            return run(x, gen, noise)
    return purify_fn


def _grad(run, params_ctx):
    def gradient_fn(x, v, gen, noise=None):
        xg = x.clone().requires_grad_(True)
        if params_ctx is None:
            (g,) = torch.autograd.grad(run(xg, gen, noise), xg, v)
            return g
        with params_ctx:
            (g,) = torch.autograd.grad(run(xg, gen, noise), xg, v)
        return g
    return gradient_fn


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (5 steps, batches 1,4, fp32+bf16): CI")
    p.add_argument("--arch", choices=ARCHES, default="digits",
                   help="digits: the embedded models; cifar: NCSN++ deep cont. + WRN-28-10 (random weights "
                        "unless checkpoints are given); cifar-small: tiny NCSN++ + WRN-16-2")
    p.add_argument("--score-ckpt", help="Score SDE checkpoint (checkpoint_8.pth of vp/cifar10_ddpmpp_deep_continuous)")
    p.add_argument("--classifier-ckpt", help="RobustBench WRN-28-10 state dict (.pt/.safetensors)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch", default=None,
                   help="comma-separated batch sizes (default: 1,8,64,512 on GPU, 1,8,32 on CPU)")
    p.add_argument("--knobs", default=None, help=f"comma-separated precision knobs from {list(KNOBS)}")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, from {ENGINES} (default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--compile", action="store_true", help="add the bf16+compile knob (purification only when lam > 0)")
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--budget", type=float, default=20.0, help="stop repeating once a measurement took this many s")
    p.add_argument("--reference-max-batch", type=int, default=64,
                   help="largest batch timed on the (slow) torchsde reference rows")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, pinned and printed (default: 1 on a CPU run, torch's on CUDA)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    if args.quick:
        args.t_star, args.repeat, args.budget = 0.005, 1, 2.0
    if args.threads is None and not gpu:
        args.threads = 1  # a shared CPU: pinned, so that runs compare; spinning OpenMP threads only contend
    default_batches = QUICK_BATCHES if args.quick else GPU_BATCHES if gpu else CPU_BATCHES
    args.batch = [int(b) for b in args.batch.split(",")] if args.batch else list(default_batches)
    default_knobs = QUICK_KNOBS if args.quick else GPU_KNOBS if gpu else CPU_KNOBS
    args.knobs = args.knobs.split(",") if args.knobs else list(default_knobs)
    if args.compile and "bf16+compile" not in args.knobs:
        args.knobs.append("bf16+compile")
    args.engines = args.engines.split(",")
    for name, values, allowed in (("--knobs", args.knobs, KNOBS), ("--engines", args.engines, ENGINES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; expected some of {list(allowed)}")
    return args


def warm_networks(score, clf, x, setting, device):
    """One step's network calls at this batch (score, guidance, a Hessian-vector product), before
    any row: the device's first-use costs (cuDNN algorithm choice, library handles) then land in no
    row's timed call, not even a slow reference row's single measured call."""
    state, t = 2 * x - 1, setting.grid.t(0)
    drift_terms(state, t, score, clf, setting.lam)
    adjoint_vjp(state, torch.ones_like(state), t, score, clf, setting.lam, True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(batch, seconds):
    return batch / seconds if seconds else float("nan")


def run_benchmark(args) -> dict:
    device = args.device
    score, clf, shape, models_desc = load_models(args, device)
    setting = PurifyConfig(ReverseGrid.from_dt(args.t_star, args.dt), args.lam, "coup")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} threads)")
    peak = device_peak(name) if device.type == "cuda" else None
    flops = count_flops(score, clf, shape, setting, device)
    report = {
        "device": name, "torch": torch.__version__, "backend_info": coup_fast.backend_info(), "models": models_desc,
        "config": {"arch": args.arch, "image_shape": list(shape), "t_star": args.t_star, "dt": args.dt, "lam": args.lam,
                   "n_steps": setting.grid.n_steps, "mode": "coup", "batches": args.batch, "knobs": args.knobs,
                   "repeat": args.repeat, "quick": args.quick,
                   "threads": torch.get_num_threads()},
        "memory_measure": ("torch.cuda.max_memory_allocated minus allocated before the run (MiB)"
                           if device.type == "cuda"
                           else "not measured on a CPU: a process's resident set reuses the pages earlier rows "
                                "freed, so per-row peaks depend on the row order (bench_cpu_purify and bench_attacks "
                                "measure single calls' peaks)"),
        "flops": flops, "peak_tflops": peak, "results": [], "errors": [],
    }
    rows = providers(args, score, clf, device)
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, *shape, generator=gen).to(device)
        v = torch.randn(batch, *shape, generator=gen).to(device)
        warm_networks(score, clf, x, setting, device)
        for engine, knob, purify_fn, gradient_fn, prec in rows:
            if engine.startswith("torchsde") and batch > args.reference_max_batch:
                continue
            row = {"engine": engine, "knob": knob, "batch": batch}
            for what, fn, per_image in (("purify", purify_fn, flops["purify_per_image"]),
                                        ("gradient", gradient_fn, flops["gradient_per_image"])):
                if fn is None:
                    continue
                clear_caches()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                call = (lambda fn=fn: fn(x, gen, None)) if what == "purify" else (lambda fn=fn: fn(x, v, gen, None))
                try:
                    with precision_context(prec, device.type):
                        m = measure(call, device, args.repeat, args.budget,
                                    reuse_warmup=engine not in ("graph", "compile"))  # their warm-up captures/compiles
                except torch.cuda.OutOfMemoryError:
                    row[what] = {"per_s": None, "notes": ["out of memory"]}
                    clear_caches()
                    torch.cuda.empty_cache()
                    continue
                rate = _rate(batch, m["seconds"])
                tflops = per_image * rate / 1e12
                row[what] = {"per_s": rate, "seconds": m["seconds"], "peak_mib": m["peak_mib"], "tflops": tflops,
                             "pct_peak": 100 * tflops / peak[prec.compute] if peak else None, "notes": m["notes"]}
            report["results"].append(row)
            print(_format_row(row), flush=True)
    report["errors"] = knob_errors(args, rows, shape, setting, device)
    clear_caches()
    return report


def knob_errors(args, rows, shape, setting, device) -> list:
    """Max |purified - fp32 eager| and cosine(gradient, fp32 eager gradient), same seed / same noise."""
    batch = min(args.batch, key=lambda b: abs(b - 8))
    gen0 = torch.Generator().manual_seed(ERROR_SEED)
    x = torch.rand(batch, *shape, generator=gen0).to(device)
    v = torch.randn(batch, *shape, generator=gen0).to(device)
    seed = draw_seed(torch.Generator().manual_seed(ERROR_SEED))
    noise = torch.stack([philox_normal(seed, k, x.shape, device=device) for k in range(setting.grid.n_steps)])
    gen = lambda: torch.Generator().manual_seed(ERROR_SEED)  # noqa: E731
    base = next((r for r in rows if r[0] == "eager" and r[1] == "fp32"), None)
    if base is None:
        return []
    with precision_context(KNOBS["fp32"], device.type):
        ref_out, ref_grad = base[2](x, gen(), None), base[3](x, v, gen(), None)
    out = []
    for engine, knob, purify_fn, gradient_fn, prec in rows:
        if engine == "torchsde":
            continue  # same as torchsde-frozen on the same noise
        with precision_context(prec, device.type):
            y = (purify_fn or rows[0][2])(x, gen(), noise)
            g = gradient_fn(x, v, gen(), noise) if gradient_fn else None
        out.append({"engine": engine, "knob": knob, "batch": batch, "max_abs_image": float((y - ref_out).abs().max()),
                    "grad_cosine": None if g is None else
                    float(torch.nn.functional.cosine_similarity(g.flatten(), ref_grad.flatten(), dim=0))})
    return out


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


HEADER = (f"{'engine':<16}{'knob':<13}{'batch':>6}{'purify img/s':>14}{'%peak':>7}{'MiB':>9}"
          f"{'grad img/s':>12}{'%peak':>7}{'MiB':>9}  notes")


def _format_row(row) -> str:
    p, g = row.get("purify", {}), row.get("gradient", {})
    notes = "; ".join(p.get("notes", []) + g.get("notes", []))
    return (f"{row['engine']:<16}{row['knob']:<13}{row['batch']:>6}{_fmt(p.get('per_s'), '.4g'):>14}"
            f"{_fmt(p.get('pct_peak'), '.1f'):>7}{_fmt(p.get('peak_mib'), '.1f'):>9}{_fmt(g.get('per_s'), '.4g'):>12}"
            f"{_fmt(g.get('pct_peak'), '.1f'):>7}{_fmt(g.get('peak_mib'), '.1f'):>9}  {notes}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {name} | torch {torch.__version__} | backend_info: {coup_fast.backend_info()}")
    print(f"COUP t*={args.t_star} dt={args.dt} lam={args.lam}; batches {args.batch}; knobs {args.knobs}"
          + ("" if args.device.type == "cuda" else "; graph engine: CUDA only (skipped)"))
    print(HEADER)
    report = run_benchmark(args)
    f = report["flops"]
    print(f"models: {report['models']}; GFLOP per image: score fwd {f['score_forward'] / 1e9:.4g}, classifier fwd "
          f"{f['classifier_forward'] / 1e9:.4g}, guided step {f['guided_step'] / 1e9:.4g}, adjoint step "
          f"{f['adjoint_step'] / 1e9:.4g} (N = {report['config']['n_steps']} steps)")
    print(f"device peak TFLOP/s (fp32/tf32/bf16): {report['peak_tflops'] or 'n/a'}; memory: {report['memory_measure']}")
    print(f"\nerror against the fp32 eager engine (batch {report['errors'][0]['batch'] if report['errors'] else '-'}, "
          "same noise)")
    print(f"{'engine':<16}{'knob':<13}{'max|d image|':>14}{'grad cosine':>14}")
    for e in report["errors"]:
        print(f"{e['engine']:<16}{e['knob']:<13}{_fmt(e['max_abs_image'], '.3g'):>14}"
              f"{_fmt(e['grad_cosine'], '.6f'):>14}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

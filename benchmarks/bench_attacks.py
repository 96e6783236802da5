"""End to end: what attacking COUP costs, side by side in one process, against the loop a researcher writes first.

    python -m benchmarks.bench_attacks [--quick] [--threads 1] [--workloads a,b,floor] [--batch 1,32,256]
    python -m benchmarks.bench_attacks --arch cifar --device cuda --batch 64 --dt 1e-2 --workloads a   # lent GPU

COUP, lam = 1, t* = 0.1, dt = 1e-3 (N = 100 guided Euler-Maruyama steps), the shipped digits models
(--arch cifar: NCSN++ deep + WRN-28-10 shapes, random weights).  Purifiers ("methods"):

- unrolled: the obvious loop, written here (`Unrolled`): N steps of plain autograd, the guidance by
  autograd.grad(create_graph=True), the backward through all of it.  Same noise as coup_fast in (a)
  (purify's Philox draws for the same seed, made before the timed call).
- diffpure: DiffPure-style torchsde sdeint_adjoint (coup_fast.reference.purify_published, the score
  network's weights trainable, hence adjoint parameters, as in DiffPure's code; guidance detached, so
  it is not the exact gradient and its noise is its own BrownianInterval).
- defaults: coup_fast's PurifiedClassifier with every default (memory='auto': step graphs kept while they
  fit a quarter of free memory; engine 'auto': eager on a CPU, CUDA graphs on a GPU).
- lean: memory='lean', the default before issue 18 (bitwise the same gradient as defaults).
- best: coup_fast's fastest exact settings: on a CPU engine='compile' (its step graphs kept within the
  default memory budget), channels_last networks (fp32: only the rounding changes); on CUDA the graph
  engine with TF32.
- bf16: the defaults with bf16-autocast networks (a precision knob: its error is reported).
- exact-bf16: the defaults with gradient='exact-bf16', the attacker's gradient with the networks under bf16
  autocast while calls without gradient (the evaluation) stay fp32 (issue 24).

Workloads:
- (a) one exact input gradient of the cross-entropy of classifier(purify(x)), B in {1, 32, 256}:
  wall time (fastest of interleaved rounds, after a warm-up round that compiles), image-gradients/s,
  peak memory of one call, x = the unrolled loop's time over the method's, and the gradient's cosine
  with the defaults' (same noise for every coup_fast row and the unrolled loop).
- (b) attacks on 32 test digits, Linf eps = 0.15: PGD-EOT (20 iterations x EOT 10; sequential EOT = 10
  calls per gradient, batched EOT = one call of 10 x 32 rows, PurifiedClassifier.sample_logits), the
  shipped coup_fast.attacks.pgd_eot, and APGD-CE (20 iterations) through pyautoattack
  (coup_fast.attacks.apgd_ce).  Wall time of the whole attack, image-gradients computed / s, peak
  memory of the attack, x = the unrolled loop's time (sequential EOT) over the row's, robust accuracy
  of the final batch (one purification: a sanity check, not an evaluation).
- floor: per step of the exact gradient at each B of (a), timed interleaved: one step of the unrolled
  loop, the networks' calls alone (score forward, guidance with its graph, the VJP through both) and
  only their convolution kernels, replayed, for NCHW and channels_last, fp32 and bf16 autocast: what
  no engine that runs torch's convolutions (eager or compiled) can beat, set against the unrolled step.

Peak memory: the peak resident set during one call minus the resident set before it, after returning
the heap's free pages (benchmarks/_harness.py); torch's allocator on CUDA.  Threads are pinned
(--threads, default 1) and printed.  Never assert on these numbers in tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import _harness as H
import coup_fast
from coup_fast import PurifiedClassifier, attacks
from coup_fast.guidance import confidence_grad
from coup_fast.noise import draw_seed, philox_normal
from coup_fast.precision import Precision, precision_context, prepare
from coup_fast.reference import purify_published
from coup_fast.sde import BETA_MAX, BETA_MIN

METHODS = ("unrolled", "diffpure", "defaults", "lean", "best", "bf16", "exact-bf16")
QUICK_METHODS = ("unrolled", "diffpure", "defaults", "lean")
# workload (b): the EOT modes each method's PGD-EOT runs in ('lean' and 'bf16' are (a)-only rows)
PGD_EOT = {"unrolled": ("sequential", "batched"), "diffpure": ("sequential",),
           "defaults": ("sequential", "batched", "attacks.pgd_eot"), "best": ("batched",),
           "exact-bf16": ("batched",)}
WORKLOADS = ("a", "b", "floor")
# the compiled engine's step graphs kept within the default budget ('fast' before memory budgets existed)
BEST_MEMORY = "auto" if "auto" in getattr(coup_fast.adjoint, "MEMORY", ()) else "fast"
LAM, EPS = 1.0, 0.15


# ----------------------------------------------------------------------------------- the baseline
class Unrolled(nn.Module):
    """classifier(purify(u)) by the obvious loop: every step on the autograd tape, the guidance by
    autograd.grad(create_graph=True).  noise: (N, B, ...) draws to use, else torch.randn per step."""

    def __init__(self, score_model, classifier, t_star=0.1, dt=1e-3, lam=LAM):
        super().__init__()
        self.score_model, self.classifier = score_model, classifier
        self.t_star, self.n_steps, self.lam = t_star, max(1, round(t_star / dt)), lam

    def guidance(self, x):
        """grad_x log max_y softmax(classifier((x + 1)/2)), differentiable when x is on the tape."""
        with torch.enable_grad():
            leaf = x if x.requires_grad else x.detach().requires_grad_(True)
            logits = self.classifier((leaf + 1) / 2)
            confidence = (logits.max(1).values - logits.logsumexp(1)).sum()
            (g,) = torch.autograd.grad(confidence, leaf, create_graph=x.requires_grad)
        return g

    def purify(self, u, noise=None):
        x, h = 2 * u - 1, self.t_star / self.n_steps
        for k in range(self.n_steps):
            t = self.t_star - k * h
            beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
            score = self.score_model(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
            z = noise[k] if noise is not None else torch.randn_like(x)
            x = x + beta * h * (0.5 * x + score + self.lam * self.guidance(x)) + math.sqrt(beta * h) * z
        return ((x + 1) / 2).clamp(0, 1)

    def forward(self, u, noise=None):
        return self.classifier(self.purify(u, noise))

    def sample_logits(self, u, samples: int):
        return self.classifier(self.purify(u.repeat(samples, *([1] * (u.ndim - 1)))))


class DiffPure(nn.Module):
    """classifier(x) of DiffPure-style purification, differentiated by torchsde's sdeint_adjoint with the
    score network's weights as adjoint parameters (a trainable copy: the other rows keep frozen ones)."""

    def __init__(self, score_model, classifier, t_star=0.1, dt=1e-3, lam=LAM):
        super().__init__()
        self.score_model = copy.deepcopy(score_model).requires_grad_(True)
        self.classifier, self.kw = classifier, dict(t_star=t_star, dt=dt, lam=lam)

    def purify(self, u, seed=None):
        seed = draw_seed() % 2**31 if seed is None else seed
        return purify_published(u, self.score_model, self.classifier, seed=seed, adjoint_params=None, **self.kw)

    def forward(self, u, seed=None):
        return self.classifier(self.purify(u, seed))

    def sample_logits(self, u, samples: int):
        return torch.cat([self(u) for _ in range(samples)])


class Counted(nn.Module):
    """A model that counts the image-gradients asked of it (rows called with grad on an input that needs it)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            self.rows += x.shape[0]
        return self.model(x)

    def sample_logits(self, x, samples: int):
        if torch.is_grad_enabled() and x.requires_grad:
            self.rows += samples * x.shape[0]
        return self.model.sample_logits(x, samples)


# ----------------------------------------------------------------------------------- models and methods
def load_models(arch: str, device):
    """(score_model, classifier, image shape, description), frozen, eval mode."""
    if arch == "cifar":
        from coup_fast.models.ncsnpp import NCSNpp, ncsnpp_cifar10_deep
        from coup_fast.models.wideresnet import WideResNet
        from coup_fast.score import score_sde_continuous

        torch.manual_seed(0)
        score, clf = score_sde_continuous(NCSNpp(ncsnpp_cifar10_deep())), WideResNet(28, 10)
        shape, desc = (3, 32, 32), "NCSN++ deep cont. + WRN-28-10 (random weights)"
    else:
        from coup_fast.models import load_digits_models

        score, clf = load_digits_models()
        shape, desc = (1, 8, 8), "shipped digits eps-net + CNN"
    for m in (score, clf):
        m.to(device).eval().requires_grad_(False)
    return score, clf, shape, desc


def build(method: str, score, clf, args, generator=None):
    """(model, context knob or None) for one method: coup_fast's methods are PurifiedClassifiers (given
    `generator`, every call draws the same noise); the knob is a precision to run the whole call under
    (TF32 is a global flag that the backward's kernels read too)."""
    kw = dict(t_star=args.t_star, dt=args.dt, lam=LAM)
    if method == "unrolled":
        return Unrolled(score, clf, **kw), None
    if method == "diffpure":
        return DiffPure(score, clf, **kw), None
    kw["generator"] = generator
    if method == "defaults":
        return PurifiedClassifier(score, clf, **kw), None
    if method == "lean":
        return PurifiedClassifier(score, clf, memory="lean", **kw), None
    if method == "bf16":
        knob = Precision("bf16")
        return PurifiedClassifier(prepare(score, knob), prepare(clf, knob), **kw), None
    if method == "exact-bf16":
        return PurifiedClassifier(score, clf, gradient="exact-bf16", **kw), None
    if method == "best":
        if args.device.type == "cuda":
            return PurifiedClassifier(score, clf, **kw), Precision("tf32")
        knob = Precision(channels_last=True)
        return PurifiedClassifier(prepare(score, knob), prepare(clf, knob), engine="compile", memory=BEST_MEMORY,
                                  **kw), None
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def _context(knob, device):
    return precision_context(knob, device.type) if knob is not None else _Null()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _peak_mib(fn, device) -> float:
    if device.type == "cuda":
        return H.cuda_peak_growth(fn) / 2**20
    return H.peak_growth(fn, trim=True) / 2**20


def _ratio(num, den):
    return num / den if num and den and math.isfinite(num) and math.isfinite(den) else None


# ----------------------------------------------------------------------------------- workload (a)
def workload_gradient(score, clf, shape, args, methods) -> list[dict]:
    """One exact input gradient of a cross-entropy per method and batch, interleaved rounds."""
    rows = []
    device, n_steps = args.device, max(1, round(args.t_star / args.dt))
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, *shape, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        seed_of = lambda: torch.Generator().manual_seed(1000 + batch)  # noqa: E731  (one seed, every call)
        seed = draw_seed(seed_of())
        noise = torch.stack([philox_normal(seed, k, x.shape, device=device) for k in range(n_steps)])
        fns = {}
        for method in methods:
            model, knob = build(method, score, clf, args)

            def fn(model=model, method=method, knob=knob):
                xr = x.clone().requires_grad_(True)
                with _context(knob, device):
                    if method == "unrolled":
                        logits = model(xr, noise)
                    elif method == "diffpure":
                        logits = model(xr, seed % 2**31)
                    else:  # the same PurifiedClassifier with a generator of the fixed seed: the same noise each call
                        logits = PurifiedClassifier(model.score_model, model.classifier,
                                                    **{**model.purify_kwargs, "generator": seed_of()})(xr)
                    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), xr)
                return grad

            fns[method] = fn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. engine='compile' falling back for bf16 Hessian products
            first = {}
            seconds = H.time_round_robin(fns, repeats=args.repeats, device=device.type, first=first)
            grads = {m: fn() for m, fn in fns.items()}
            peaks = {m: _peak_mib(fn, device) for m, fn in fns.items()}
        ref = grads.get("defaults")
        for method in methods:
            g = grads[method]
            rows.append({
                "workload": "a", "method": method, "batch": batch, "seconds": seconds[method],
                "img_grad_per_s": batch / seconds[method], "peak_mib": peaks[method], "first_call_s": first[method],
                "x_unrolled": _ratio(seconds.get("unrolled"), seconds[method]),
                "x_diffpure": _ratio(seconds.get("diffpure"), seconds[method]),
                "cos_defaults": None if ref is None else float(F.cosine_similarity(g.flatten(), ref.flatten(), dim=0)),
                "max_rel_defaults": None if ref is None else float((g - ref).abs().max() / ref.abs().max()),
            })
        print(f"  (a) B = {batch}: " + ", ".join(f"{m} {seconds[m]:.3g} s" for m in methods), flush=True)
    return rows


# ----------------------------------------------------------------------------------- workload (b)
def pgd_eot(model, x, y, *, eps, n_iter, eot, batched, seed=0):
    """PGD-EOT under Linf as coup_fast.attacks.pgd_eot runs it (random start, step 2.5 eps / n_iter, sign
    ascent), the EOT gradient from `eot` sequential calls or from one batched model.sample_logits call."""
    torch.manual_seed(seed)
    step = 2.5 * eps / n_iter
    delta = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1) - x
    for _ in range(n_iter):
        xr = (x + delta).detach().requires_grad_(True)
        if batched:
            loss = F.cross_entropy(model.sample_logits(xr, eot), y.repeat(eot), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xr)
        else:
            grad = torch.zeros_like(x)
            for _ in range(eot):
                grad += torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)[0]
        delta = (delta + step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def workload_attacks(score, clf, args, methods) -> list[dict]:
    """PGD-EOT (sequential and batched EOT), the shipped pgd_eot and APGD-CE, per method, on the test digits."""
    from coup_fast.data import load_digits

    x, y = load_digits("test")
    x, y = x[:args.n_images].to(args.device), y[:args.n_images].to(args.device)
    cases = [(method, "pgd-eot", eot) for method in methods for eot in PGD_EOT.get(method, ())]
    cases += [(method, "apgd-ce", "-") for method in methods if method in PGD_EOT]
    rows = []
    for method, attack, eot_mode in cases:
        model, knob = build(method, score, clf, args)
        counted = Counted(model)
        torch.manual_seed(0)
        result = {}

        def run():
            start = time.perf_counter()
            with _context(knob, args.device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if attack == "apgd-ce":
                    settings = attacks.AttackSettings(n_iter=args.apgd_iter)
                    result["adv"] = attacks.apgd_ce(counted, x, y, norm="Linf", eps=EPS, seed=0, settings=settings)
                elif eot_mode == "attacks.pgd_eot":  # the shipped attack on the PurifiedClassifier itself
                    result["adv"] = attacks.pgd_eot(model, x, y, norm="Linf", eps=EPS, n_iter=args.pgd_iter,
                                                    eot=args.eot)
                    counted.rows = args.pgd_iter * args.eot * x.shape[0]
                else:
                    result["adv"] = pgd_eot(counted, x, y, eps=EPS, n_iter=args.pgd_iter, eot=args.eot,
                                            batched=eot_mode == "batched")
            H.sync(str(args.device))
            result["seconds"] = time.perf_counter() - start

        if method == "best":  # compile / capture for the attack's shapes first (not counted)
            with warnings.catch_warnings(), _context(knob, args.device):
                warnings.simplefilter("ignore")
                for b in sorted({x.shape[0], args.eot * x.shape[0]}):
                    xr = x[:1].repeat(b, 1, 1, 1).requires_grad_(True)
                    torch.autograd.grad(model(xr).sum(), xr)
                    with torch.no_grad():
                        model(xr)
        peak = _peak_mib(run, args.device)
        seconds = result["seconds"]
        with torch.no_grad(), _context(knob, args.device):
            robust = float((model(result["adv"]).argmax(1) == y).float().mean())
        rows.append({"workload": "b", "method": method, "attack": attack, "eot": eot_mode, "seconds": seconds,
                     "img_grad_per_s": counted.rows / seconds, "image_gradients": counted.rows, "peak_mib": peak,
                     "robust_acc": robust})
        print(f"  (b) {method} {attack} {eot_mode}: {seconds:.1f} s", flush=True)
    base = {r["attack"]: r["seconds"] for r in rows if r["method"] == "unrolled" and r["eot"] in ("sequential", "-")}
    for r in rows:
        r["x_unrolled"] = _ratio(base.get(r["attack"]), r["seconds"])
    return rows


# ----------------------------------------------------------------------------------- floor
def _repeated(fn, n: int):
    def run():
        for _ in range(n):
            fn()
    return run


def workload_floor(score, clf, shape, args, step_ms: dict) -> list[dict]:
    """Per step of the exact gradient: one step of the unrolled loop (forward with its graph, backward
    through it), the networks' calls alone, and their convolution kernels alone, per layout and
    precision, timed interleaved; the engines' measured steps (from workload a) beside them."""
    rows = []
    for batch in args.batch:
        x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(args.device)
        a = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(args.device)
        t = torch.full((batch,), 0.05, device=args.device)
        base = Unrolled(score, clf, t_star=args.dt, dt=args.dt)  # one step
        noise = torch.zeros(1, *x.shape, device=args.device)

        def unrolled_step():
            u = ((x + 1) / 2).requires_grad_(True)
            torch.autograd.grad(base.purify(u, noise), u, a)

        n = max(1, 64 // batch)  # calls per timed sample
        fns = {"unrolled": _repeated(unrolled_step, n)}
        layouts = (("fp32 NCHW", Precision()), ("fp32 channels_last", Precision(channels_last=True)),
                   ("bf16 NCHW", Precision("bf16")), ("bf16 channels_last", Precision("bf16", channels_last=True)))
        calls = {}
        for name, knob in layouts:
            s, c = prepare(score, knob), prepare(clf, knob)

            def step(s=s, c=c):
                leaf = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    sc = s(leaf, t)
                    g = confidence_grad(c, leaf, create_graph=True)
                    return torch.autograd.grad((sc, g), leaf, (a, a * LAM))[0]

            calls[name] = H.recorded_convolutions(step)

            def convolutions(recorded=calls[name]):
                H.replay(recorded)

            fns["networks " + name], fns["conv " + name] = _repeated(step, n), _repeated(convolutions, n)
        best = H.time_round_robin(fns, repeats=5, device=args.device.type)
        ms = {k: 1e3 * v / n for k, v in best.items()}
        for name, _ in layouts:
            rows.append({"workload": "floor", "batch": batch, "layout": name, "unrolled_ms": ms["unrolled"],
                         "networks_ms": ms["networks " + name], "conv_ms": ms["conv " + name],
                         "conv_calls": len(calls[name]), "defaults_ms": step_ms.get(("defaults", batch)),
                         "best_ms": step_ms.get(("best", batch))})
    for r in rows:
        r["max_x_unrolled"] = _ratio(r["unrolled_ms"], r["conv_ms"])
    return rows


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI size (well under a minute): t* = 0.005, B = 1, 4, 4 digits, PGD 2 x EOT 2, APGD 2, no compile")
    p.add_argument("--arch", choices=("digits", "cifar"), default="digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned; printed)")
    p.add_argument("--workloads", default=None, help=f"comma-separated from {WORKLOADS} (default: all on digits, a on cifar)")
    p.add_argument("--methods", default=None, help=f"comma-separated from {METHODS}")
    p.add_argument("--batch", default=None, help="batch sizes of (a) (default 1,32,256; --arch cifar: 64)")
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of (a) after the warm-up round (fastest kept)")
    p.add_argument("--n-images", type=int, default=32)
    p.add_argument("--pgd-iter", type=int, default=20)
    p.add_argument("--eot", type=int, default=10)
    p.add_argument("--apgd-iter", type=int, default=20)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.quick:
        args.t_star, args.repeats, args.n_images, args.pgd_iter, args.eot, args.apgd_iter = 0.005, 1, 4, 2, 2, 2
    args.batch = [int(b) for b in args.batch.split(",")] if args.batch else (
        [1, 4] if args.quick else [64] if args.arch == "cifar" else [1, 32, 256])
    args.workloads = args.workloads.split(",") if args.workloads else (["a"] if args.arch == "cifar" else list(WORKLOADS))
    default_methods = QUICK_METHODS if args.quick else ("diffpure", "defaults", "best") if args.arch == "cifar" else METHODS
    args.methods = args.methods.split(",") if args.methods else list(default_methods)
    for name, values, allowed in (("--workloads", args.workloads, WORKLOADS), ("--methods", args.methods, METHODS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; expected some of {list(allowed)}")
    return args


def _print_tables(report):
    rows = report["rows"]
    a = [r for r in rows if r["workload"] == "a"]
    if a:
        print("\n(a) one exact input gradient of a cross-entropy (x = the unrolled loop's time / the row's; "
              "cos = gradient cosine with the defaults')")
        print(H.table(a, [("batch", "B"), ("method", "method"), ("seconds", "s"), ("first_call_s", "1st call s"),
                          ("img_grad_per_s", "img-grad/s"),
                          ("peak_mib", "peak MiB"), ("x_unrolled", "x unrolled"), ("x_diffpure", "x DiffPure"),
                          ("cos_defaults", "cos"), ("max_rel_defaults", "max rel diff")]))
    b = [r for r in rows if r["workload"] == "b"]
    if b:
        print("\n(b) attacks, Linf eps = 0.15 (x = the unrolled loop's attack time, sequential EOT, / the row's)")
        print(H.table(b, [("attack", "attack"), ("method", "method"), ("eot", "EOT"), ("seconds", "s"),
                          ("image_gradients", "img-grads"), ("img_grad_per_s", "img-grad/s"), ("peak_mib", "peak MiB"),
                          ("x_unrolled", "x unrolled"), ("robust_acc", "robust acc")]))
    fl = [r for r in rows if r["workload"] == "floor"]
    if fl:
        print("\nfloor, per step of the exact gradient (ms, timed interleaved): one step of the unrolled loop, the "
              "networks' calls alone and only their convolution kernels, per layout and precision; max x = the unrolled "
              "step / the convolutions alone, the most any engine running these convolutions can gain; defaults / best "
              "step = workload (a)'s time / N")
        print(H.table(fl, [("batch", "B"), ("layout", "layout"), ("unrolled_ms", "unrolled step"),
                           ("networks_ms", "networks"), ("conv_ms", "convolutions"), ("conv_calls", "conv calls"),
                           ("max_x_unrolled", "max x"), ("defaults_ms", "defaults step"), ("best_ms", "best step")]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    score, clf, shape, desc = load_models(args.arch, args.device)
    n_steps = max(1, round(args.t_star / args.dt))
    device = H.device_name(str(args.device))
    print(f"device: {device}; torch {torch.__version__}; ops {coup_fast.backend_info()['cpu']}; models: {desc}")
    print(f"COUP lam = {LAM}, t* = {args.t_star}, dt = {args.dt} (N = {n_steps}); methods {args.methods}; "
          f"workloads {args.workloads}", flush=True)
    report = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "models": desc,
              "config": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}, "rows": []}
    step_ms = {}
    if "a" in args.workloads:
        rows = workload_gradient(score, clf, shape, args, args.methods)
        report["rows"] += rows
        step_ms = {(r["method"], r["batch"]): 1e3 * r["seconds"] / n_steps for r in rows}
    if "b" in args.workloads:
        report["rows"] += workload_attacks(score, clf, args, args.methods)
    if "floor" in args.workloads and args.device.type == "cpu":
        report["rows"] += workload_floor(score, clf, shape, args, step_ms)
    _print_tables(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"\nJSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)

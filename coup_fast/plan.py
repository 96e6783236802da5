"""What an evaluation will cost, before it runs: `coup-fast eval --dry-run`.

Counts are per image and are upper bounds: every image is assumed to survive every sub-attack, so
nothing is skipped (AutoAttack only attacks the images still robust; a real run costs less).  A
"gradient" is one input gradient through the defense for one EOT draw (one forward solve and its
backward); a "purification" is one forward solve of one draw.  EOT draws and the R evaluations are
batched (coup_fast.attacks: `samples` draws of B images in one call of B x samples rows), so each
kind of call is measured at the batch it runs at: a few steps of each kind on this device, scaled by
the step count N (M for likelihood maximization).  Every candidate an attack returns is re-purified
R times (coup_fast.attacks.candidate_count).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from .attacks import AA_VERSIONS, AttackSettings, candidate_count, diffattack, diffhammer, sample_logits
from .lm import LMConfig
from .purify import PurifiedClassifier
from .sde import ReverseGrid
from .solver import LM_MODE

# Seconds per image and per step on one NVIDIA H200, NCSN++ deep + WRN-28-10 at batch 64, N = 10 steps, graph
# engine with TF32.  Measured (README, commit 3027351): purification 161 img/s, the exact gradient 46.4 img-grad/s
# per 10 steps; 'detached-guidance' is priced as the exact gradient (an upper bound: it skips the classifier's
# double backward).
# 'adjoint' is PROJECTED, not measured: the published attack now runs on the graph engine (coup_fast.published;
# torchsde fp32 measured 8.02 img-grad/s per 10 steps).  Per step it runs the purification step forward and, backward,
# one score forward + VJP and one guidance (classifier forward + backward) at the reconstructed state: the
# detached-guidance lean backward plus one guidance, i.e. the exact gradient's step without the classifier's double
# backward (lam H a).  So it is priced at the exact gradient's measured rate, an upper bound until
# `gpu_session.sh published` measures it.  (The cifar10 preset's dry run: 5.55e3 H200-hours with torchsde's rate,
# 2.44e3 with this one.)
# 'exact-bf16' is priced as TF32's exact gradient: not measured in bf16 there (an upper bound; bf16 purification ran
# 1.19x TF32's).
H200_CIFAR_STEP_SECONDS = {"purify": 1 / (161 * 10), "exact": 1 / (46.4 * 10), "detached-guidance": 1 / (46.4 * 10),
                           "adjoint": 1 / (46.4 * 10), "bpda": 1 / (161 * 10), "exact-bf16": 1 / (46.4 * 10)}
PURIFY, GRADIENT, BPDA = "purify", "gradient", "bpda"  # GRADIENT: the row's own attacker gradient


@dataclass(frozen=True)
class Work:
    """Per image: solver calls as ((kind, samples per batched call), count) pairs; kind PURIFY, GRADIENT or BPDA."""

    calls: tuple = ()

    @classmethod
    def of(cls, kind: str, count: float, samples: int = 1) -> "Work":
        return cls((((kind, int(samples)), float(count)),)) if count else cls()

    def __add__(self, other: "Work") -> "Work":
        merged = dict(self.calls)
        for key, count in other.calls:
            merged[key] = merged.get(key, 0.0) + count
        return Work(tuple(sorted(merged.items())))

    @property
    def purifications(self) -> float:
        return sum(c for (kind, _), c in self.calls if kind == PURIFY)

    @property
    def gradients(self) -> float:
        return sum(c for (kind, _), c in self.calls if kind != PURIFY)

    def kinds(self) -> set:
        return {key for key, _ in self.calls}


def _samples(k: int, settings: AttackSettings) -> int:
    return k if settings.eot_chunk is None else max(1, min(k, settings.eot_chunk))


def _eot_gradients(count: int, eot: int, settings: AttackSettings, randomized: bool, kind: str = GRADIENT) -> Work:
    """`count` EOT gradients of `eot` draws each: one batched call per gradient (a deterministic model needs one draw)."""
    eot = eot if randomized else 1
    return Work.of(kind, count * eot, _samples(eot, settings))


def evaluation_work(n_candidates: int, n_eval: int, settings: AttackSettings, randomized: bool = True) -> Work:
    """R purifications of each candidate, batched (R = 1 for a deterministic model)."""
    runs = n_eval if randomized else 1
    return Work.of(PURIFY, n_candidates * runs, _samples(runs, settings))


def attack_work(attack: str, settings: AttackSettings, n_eval: int, randomized: bool = True, model=None) -> Work:
    """Upper bound of the work one image costs under `attack` ('clean' included), evaluation included.

    model: the defense, where the count depends on it (diffhammer replays its chosen paths in one purification
    for the SDE purifiers, in up to N for likelihood maximization and the published adjoint; None: one)."""
    if attack == "clean":
        return evaluation_work(1, n_eval, settings, randomized)
    evaluation = evaluation_work(candidate_count(attack, settings), n_eval, settings, randomized)
    s = settings
    if attack == "diffattack":  # APGD per round: a gradient at the start and one per iteration, EOT draws batched
        return _eot_gradients(len(diffattack.ROUNDS) * (s.diffattack_iter + 1), s.diffattack_eot, s, randomized) \
            + evaluation
    if attack == "diffhammer":  # per APGD call: N paths (a purification and a classifier backward) + the grafting
        calls = s.diffhammer_restarts * (s.diffhammer_iter + 1)
        replays = 1 if model is None else diffhammer.replays_per_iteration(model, s.diffhammer_n)
        return (_eot_gradients(calls, s.diffhammer_n, s, randomized, BPDA) + Work.of(GRADIENT, calls * replays)
                + evaluation)
    if attack == "apgd-ce":  # APGD: one gradient at the start point and one per iteration, on every image
        return _eot_gradients(s.n_restarts * (s.n_iter + 1), s.apgd_eot, s, randomized) + evaluation
    if attack == "pgd-eot":
        return _eot_gradients(s.pgd_iter, s.pgd_eot, s, randomized) + evaluation
    if attack == "bpda-eot":  # a BPDA gradient is one purification and a classifier backward
        return _eot_gradients(s.bpda_iter, s.bpda_eot, s, randomized, BPDA) + evaluation
    work = Work()
    for version in AA_VERSIONS[attack]:
        # pyautoattack's checks (check_randomized: 5 calls, 'standard' only; the output range; the dynamic-defense
        # trace), its clean check, and each sub-attack's own clean check and final check
        sub_attacks = 2 if version == "rand" else 4
        work = work + Work.of(PURIFY, (7 if version == "standard" else 2) + 1 + 2 * sub_attacks)
        if version == "rand":  # APGD-CE and APGD-DLR with EOT, one restart
            work = work + _eot_gradients(2 * (s.n_iter + 1), s.eot, s, randomized)
        else:  # APGD-CE, APGD-T over the target classes, FAB-T (one gradient per iteration), Square (forwards)
            targets = s.n_target_classes
            work = (work + Work.of(GRADIENT, s.n_restarts * (s.n_iter + 1) + targets * (s.n_iter + 1)
                                   + targets * s.fab_iter) + Work.of(PURIFY, s.square_queries))
    return work + evaluation


def diagnostics_work(check: str, settings: AttackSettings, n_eval: int, draws: int, iterations: int,
                     randomized: bool = True) -> Work:
    """Per diagnostic image: 'consistency' (`draws` single-draw exact gradients in one batch) or 'large-eps' (PGD-EOT
    of `iterations` from the clean image, its two candidates evaluated R times)."""
    if check == "consistency":
        return Work.of("exact", draws, _samples(draws, settings))
    return _eot_gradients(iterations, settings.pgd_eot, settings, randomized) + evaluation_work(2, n_eval, settings,
                                                                                                  randomized)


def solver_steps(purified) -> int:
    """The steps one call of a purified model runs: N Euler steps, or M likelihood-maximization steps."""
    kw = purified.purify_kwargs
    if kw.get("mode") == LM_MODE:
        return (kw.get("lm") or LMConfig()).n_steps
    return ReverseGrid.from_dt(kw.get("t_star", 0.1), kw.get("dt", 1e-3)).n_steps


def measure_step_seconds(purified, x: torch.Tensor, y: torch.Tensor, kinds, steps: int = 2, warmup: bool = True,
                         samples: int = 1) -> dict:
    """Seconds per image row and per step of each kind ('purify' or an attacker gradient) for a PurifiedClassifier,
    from `steps` steps (SDE steps, or likelihood-maximization steps) at batch x.shape[0] x `samples` (after one
    untimed warm-up call)."""
    kwargs = dict(purified.purify_kwargs)
    per_call = min(steps, solver_steps(purified))  # a few steps of either kind; their cost scales with the count
    if kwargs.get("mode") == LM_MODE:  # M optimizer steps, of which `steps` are measured (M may be large)
        short = {**kwargs, "lm": dataclasses.replace(kwargs.get("lm") or LMConfig(), n_steps=per_call)}
    else:
        short = {**kwargs, "t_star": per_call * kwargs.get("dt", 1e-3)}
    out = {}
    for kind in kinds:
        model = PurifiedClassifier(purified.score_model, purified.classifier,
                                   **{**short, "gradient": "exact" if kind == "purify" else kind})

        def run():
            if kind == "purify":
                with torch.no_grad():
                    sample_logits(model, x, samples)
                return
            xr = x.detach().clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(sample_logits(model, xr, samples), y.repeat(samples))
            torch.autograd.grad(loss, xr)

        if warmup:
            run()
        _sync(x)
        start = time.perf_counter()
        run()
        _sync(x)
        out[kind] = (time.perf_counter() - start) / (per_call * x.shape[0] * samples)
    return out


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 360 else f"{seconds:.3g} s"


def estimate(work: Work, n_images: int, n_steps: int, step_seconds, gradient: str) -> float:
    """Seconds for `n_images` images under `work`.  step_seconds(kind, samples) -> seconds per image row and step
    (NaN when not measured), or a dict {kind: seconds} used at every batch size; GRADIENT calls are the row's
    attacker `gradient`."""
    lookup = step_seconds if callable(step_seconds) else (lambda kind, samples: step_seconds.get(kind, math.nan))
    total = 0.0
    for (kind, samples), count in work.calls:
        total += count * lookup(gradient if kind == GRADIENT else kind, samples)
    return n_images * n_steps * total

"""What an evaluation will cost, before it runs: `coup-fast eval --dry-run`.

Counts are per image and are upper bounds: every image is assumed to survive every sub-attack, so
nothing is skipped (AutoAttack only attacks the images still robust; a real run costs less).  A
"gradient" is one input gradient through the defense (one forward solve and its backward); a
"purification" is one forward solve.  Times come from a few measured steps of each kind on this
device, scaled by the step count N and linearly in the batch size.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .attacks import AA_VERSIONS, AttackSettings
from .purify import PurifiedClassifier

# Measured on one NVIDIA H200 (README, commit 3027351): NCSN++ deep + WRN-28-10 at batch 64, N = 10 steps,
# graph engine with TF32 for purification and the exact gradient, torchsde fp32 for the published adjoint.
# Seconds per image and per step.
H200_CIFAR_STEP_SECONDS = {"purify": 1 / (161 * 10), "exact": 1 / (46.4 * 10), "detached-guidance": 1 / (46.4 * 10),
                           "adjoint": 1 / (8.02 * 10), "bpda": 1 / (161 * 10)}


@dataclass(frozen=True)
class Work:
    """Per image: forward solves (evaluations, BPDA's forwards) and input gradients of the defense."""

    purifications: float = 0.0
    gradients: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.purifications + other.purifications, self.gradients + other.gradients)


def _apgd(settings: AttackSettings, eot: int = 1, restarts: int | None = None) -> Work:
    # APGD: one gradient at the start point and one per iteration, each averaged over `eot` draws.
    return Work(gradients=(settings.n_restarts if restarts is None else restarts) * (settings.n_iter + 1) * eot)


def attack_work(attack: str, settings: AttackSettings, n_eval: int) -> Work:
    """Upper bound of the work one image costs under `attack` ('clean' included), evaluation included."""
    evaluation = Work(purifications=n_eval)
    if attack == "clean":
        return evaluation
    if attack == "apgd-ce":
        return _apgd(settings) + evaluation
    if attack == "pgd-eot":
        return Work(gradients=settings.pgd_iter * settings.pgd_eot) + evaluation
    if attack == "bpda-eot":  # a BPDA gradient is one purification and a classifier backward
        return Work(purifications=settings.bpda_iter * settings.bpda_eot) + evaluation
    work = Work()
    for version in AA_VERSIONS[attack]:
        work = work + Work(purifications=1)  # AutoAttack's clean check
        if version == "rand":  # APGD-CE and APGD-DLR with EOT, one restart
            work = work + _apgd(settings, settings.eot, 1) + _apgd(settings, settings.eot, 1)
        else:  # APGD-CE, APGD-T over the target classes, FAB-T (one gradient per iteration), Square (forwards)
            targets = settings.n_target_classes
            work = (work + _apgd(settings) + Work(gradients=targets * (settings.n_iter + 1))
                    + Work(gradients=targets * settings.fab_iter) + Work(purifications=settings.square_queries))
        work = work + evaluation
    return work


def measure_step_seconds(purified, x: torch.Tensor, y: torch.Tensor, kinds, steps: int = 2, warmup: bool = True) -> dict:
    """Seconds per image and per step of each kind ('purify' or an attacker gradient) for a
    PurifiedClassifier, from `steps` steps at x's batch size (after one untimed warm-up call)."""
    kwargs = dict(purified.purify_kwargs)
    dt = kwargs.get("dt", 1e-3)
    short = {**kwargs, "t_star": steps * dt}
    out = {}
    for kind in kinds:
        model = PurifiedClassifier(purified.score_model, purified.classifier,
                                   **{**short, "gradient": "exact" if kind == "purify" else kind})

        def run():
            if kind == "purify":
                with torch.no_grad():
                    model(x)
                return
            xr = x.detach().clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(xr), y)
            torch.autograd.grad(loss, xr)

        if warmup:
            run()
        _sync(x)
        start = time.perf_counter()
        run()
        _sync(x)
        out[kind] = (time.perf_counter() - start) / (steps * x.shape[0])
    return out


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 360 else f"{seconds:.3g} s"


def estimate(work: Work, n_images: int, n_steps: int, step_seconds: dict, gradient: str) -> float:
    """Seconds for `n_images` images under `work`, from per-image-per-step seconds of 'purify' and of the
    attacker's `gradient` (NaN when that kind was not measured)."""
    grad_seconds = step_seconds.get(gradient, math.nan) if work.gradients else 0.0
    return n_images * n_steps * (work.purifications * step_seconds["purify"] + work.gradients * grad_seconds)

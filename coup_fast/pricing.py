"""What an evaluation costs: the dry run's upper bound, and a pilot's price from measured survival.

- `dry_run(cfg, models, x, y)` (`coup-fast eval --dry-run`): the purifications and gradients per image of every
  defense x threat x attack and check, each kind of call measured for a few steps on this device, scaled by N, and
  for CIFAR the H200 projection from README's rates.  Upper bounds: every image is assumed to meet every attack.
- `pilot(cfg, ...)` (`--pilot K`): runs the real schedule on the batches holding the first K images (their records
  are the real run's, so it resumes from them), then prices the full run from what it measured: per stage (a row x
  attack of a defense, in the cascade's order), the share S_s of the pilot's images still standing when the stage
  started and its seconds per image it attacked, c_s.  The full run's time is

      T = sum over stages s of  c_s x (n_diag + (n - n_diag) x S_s)

  (the diagnostic images meet every stage), beside the upper bound sum_s c_s x n (every S_s = 1), which is what the
  full schedule costs.
"""
from __future__ import annotations

import os
import time

import torch

from . import plan
from .attacks import OWN_GRADIENT, is_randomized
from .config import EvalConfig
from .diagnostics import DIAG_ITER
from .evaluate import evaluate
from .solver import LM_MODE
from .table import CLEAN

def dry_run(cfg: EvalConfig, models: dict, x, y) -> str:
    """The plan of the run `cfg` describes, with measured step times (coup_fast.plan): returned as text."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A few steps of the whole batch after a warm-up call, at each batch the run uses (B x EOT draws, B x R), except
    # for CIFAR-size networks on a CPU: one step of two images, no warm-up, scaled linearly (seconds per image there,
    # the cost close to linear in the batch, and first-call costs small beside it)
    small = cfg.data == "digits" or x.is_cuda
    batch = min(cfg.batch_size, x.shape[0]) if small else min(cfg.batch_size, x.shape[0], 2)
    steps = 2 if small else 1
    xb, yb = x[:batch], y[:batch]
    settings, cifar = cfg.attack_settings(), cfg.data != "digits"
    lines = [f"coup-fast eval --dry-run: {cfg.data}, {x.shape[0]} images of shape {tuple(x.shape[1:])} on {x.device}, "
             f"batches of {cfg.batch_size}, R = {cfg.n_eval}; every checkpoint loaded strictly, its weights finite, and one "
             f"image through each network gave finite outputs of the right shapes.",
             f"Step times measured at {batch} image(s) x the draws per batched call, over {steps} step(s)"
             f"{' after a warm-up' if small else ', scaled linearly in the batch'}, then scaled by N; counts are per "
             f"image and upper bounds (no image is assumed broken early), EOT draws and R evaluations counted one by one.",
             "", "| defense | threat | attack | N | purifications / img | gradients / img | this device |"
             + (" H200 (README rates) |" if cifar else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if cifar else "")]
    total = h200_total = 0.0
    measured = {}  # a step costs the same at every t*; guided and unguided steps differ, and LM from SDE steps
    groups = {label: label.partition("@")[0] for label in models}
    first = {}
    for label in models:
        first.setdefault(groups[label], label)

    def seconds_for(model):
        purified = hasattr(model, "purify_kwargs")
        if purified:
            kw = model.purify_kwargs
            key = (kw["mode"] == LM_MODE, kw["mode"] in ("coup", LM_MODE) and kw["lam"] > 0)
        else:
            key = ("classifier",)

        def lookup(kind, samples):
            samples = samples if small else 1
            if (key, kind, samples) not in measured:
                if purified:
                    measured[key, kind, samples] = plan.measure_step_seconds(model, xb, yb, [kind], steps, small,
                                                                             samples)[kind]
                else:
                    measured[key, kind, samples] = _classifier_seconds(model, xb, yb, kind, samples)
            return measured[key, kind, samples]
        return lookup

    def add_row(label, threat, what, work, n_images, model):
        nonlocal total, h200_total
        purified = hasattr(model, "purify_kwargs")
        gradient = model.purify_kwargs["gradient"] if purified else "exact"
        n_steps = plan.solver_steps(model) if purified else 1
        here = plan.estimate(work, n_images, n_steps, seconds_for(model), gradient)
        total += here
        row = (f"| {label} | {threat} | {what} | {n_steps} | {work.purifications:.0f} | {work.gradients:.0f} "
               f"| {plan.hours(here)} |")
        if cifar and purified and model.purify_kwargs["mode"] != LM_MODE:
            h200 = plan.estimate(work, n_images, n_steps, plan.H200_CIFAR_STEP_SECONDS, gradient)
            h200_total += h200
            row += f" {plan.hours(h200)} |"
        elif cifar:  # a bare WRN-28-10 (little beside purification) and the DDPM's LM steps were not measured there
            row += " – |"
        lines.append(row)

    n_tasks = 0
    n_batches = -(-x.shape[0] // cfg.batch_size)
    n_diag = min(cfg.diag_images, x.shape[0])
    for label, per_threat in models.items():
        for threat in cfg.threats:
            model = per_threat[threat]
            randomized = is_randomized(model)
            for attack in ["clean", *cfg.attacks]:
                if (attack == "clean" or attack in OWN_GRADIENT) and first[groups[label]] != label:
                    lines.append(f"| {label} | {threat} | {attack} | | | | shared with {first[groups[label]]} |"
                                 + (" |" if cifar else ""))
                    continue
                n_tasks += n_batches
                add_row(label, threat, attack, plan.attack_work(attack, settings, cfg.n_eval, randomized, model),
                        x.shape[0], model)
            if cfg.diagnostics:
                checks = ["large-eps"] + (["consistency"] if randomized and first[groups[label]] == label else [])
                for check in checks:
                    n_tasks += 1
                    work = plan.diagnostics_work(check, settings, cfg.n_eval, cfg.diag_draws, DIAG_ITER, randomized)
                    add_row(label, threat, f"check {check} ({n_diag} images)", work, n_diag, model)
    lines += ["", f"Total on this device: {plan.hours(total)} in one process; {n_tasks} tasks, dealt round-robin to "
                  f"torchrun's ranks: about {plan.hours(total / world)} with the {world} rank(s) of this launch, "
                  f"{plan.hours(total / 8)} with 8 (torchrun --nproc_per_node=8, one GPU each)."]
    if cifar:
        lines.append(f"On one H200 (README's measured rates for NCSN++ deep + WRN-28-10 at batch 64: graph engine, "
                     f"TF32; the published adjoint on coup_fast's own solver projected at the exact gradient's rate, "
                     f"plan.H200_CIFAR_STEP_SECONDS): {plan.hours(h200_total)}.")
    if cfg.schedule == "cascade":
        lines.append(f"Schedule 'cascade': later stages attack only the images still standing, so a real run costs "
                     f"less; the bound above is what --schedule full costs.  A pilot (--pilot K) measures the share "
                     f"S_s of images still standing at each stage s and its seconds per image c_s, and prices "
                     f"T = sum_s c_s (n_diag + (n - n_diag) S_s) with n = {x.shape[0]}, n_diag = {n_diag}"
                     + (" (on random weights the shares mean nothing: run the pilot with the real checkpoints)."
                        if cifar else "."))
    lines.append("Nothing was run: drop --dry-run to start (interrupted runs resume from --out).")
    return "\n".join(lines)


def _classifier_seconds(classifier, x, y, kind: str, samples: int = 1) -> float:
    """Seconds per image row of a classifier forward ('purify') or forward + input gradient (any other kind), at
    batch x.shape[0] x samples."""
    xs = x.repeat(samples, *[1] * (x.ndim - 1))
    ys = y.repeat(samples)

    def run():
        if kind == "purify":
            with torch.no_grad():
                classifier(xs)
            return
        xr = xs.detach().clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(classifier(xr), ys), xr)

    run()
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / xs.shape[0]




# ------------------------------------------------------------------------------------------------------- pilot
def pilot_batches(cfg: EvalConfig, n_images: int) -> list:
    """The batches of the run that hold its first cfg.pilot images (whole batches: their records are the run's)."""
    return list(range(-(-min(cfg.pilot, n_images) // cfg.batch_size)))


def pilot(cfg: EvalConfig, models: dict, x, y, evaluate_kwargs: dict) -> str:
    """Run the schedule on the first batches, then price the full run from them (module docstring): returned as text."""
    batches = pilot_batches(cfg, x.shape[0])
    start = time.perf_counter()
    table = evaluate(models, x, y, batches=batches, **evaluate_kwargs)
    wall = time.perf_counter() - start
    stages = stage_measurements(table.meta["stages"])
    n, n_diag = x.shape[0], min(cfg.diag_images, x.shape[0])
    pilot_n = table.meta["n"]
    lines = [f"coup-fast eval --pilot {cfg.pilot}: batches {batches[0]}..{batches[-1]} ({pilot_n} images of {n}, "
             f"schedule '{cfg.schedule}') ran in {wall:.0f} s; their records are in {cfg.out} and the full run resumes "
             "from them.", "",
             "| defense | threat | stage (row: attack) | images met / standing | S_s (share standing) | c_s (s / image) "
             "| full run, priced | upper bound |", "|---|---|---|---:|---:|---:|---:|---:|"]
    total = bound = 0.0
    for (group, threat), rows in stages.items():
        for stage in rows:
            priced = stage["c"] * (n_diag + (n - n_diag) * stage["S"])
            upper = stage["c"] * n
            total, bound = total + priced, bound + upper
            lines.append(f"| {group} | {threat} | {stage['stage']} | {stage['met']} / {stage['standing']} | "
                         f"{stage['S']:.2f} | {stage['c']:.3g} | {plan.hours(priced)} | {plan.hours(upper)} |")
    checks = table.meta.get("check_seconds", 0.0)  # the gradient-masking checks: once per run, on the first images
    total, bound = total + checks, bound + checks
    lines += ["", f"Priced full run on this device: {plan.hours(total)} (upper bound, every image meeting every stage: "
                  f"{plan.hours(bound)}; {bound / max(total, 1e-12):.2f}x; both include the gradient-masking checks' "
                  f"{plan.hours(checks)}, run once).  S_s: the share of the pilot's "
                  f"{pilot_n - min(n_diag, pilot_n)} non-diagnostic images still robust (Worst-of-R) when stage s started; "
                  "c_s: the stage's seconds per image it attacked.  Priced T = sum_s c_s (n_diag + (n - n_diag) S_s) "
                  f"with n = {n}, n_diag = {n_diag}.  The pilot's images are a small sample: read S_s with its "
                  "uncertainty (a share of k images)."]
    if cfg.data != "digits" and _random_weights_suspected(table):
        lines.append("The defenses broke nothing or everything in the pilot: with random (untrained) weights the "
                     "shares mean nothing; the formula above is what a pilot with real checkpoints fills in.")
    return "\n".join(lines)


def stage_measurements(stages: dict) -> dict:
    """{(group, threat): [{'stage', 'met', 'standing', 'S', 'c'}]} from evaluate's per-stage tallies
    (table.meta['stages']: per group and threat, per stage its images met, the non-diagnostic ones standing before
    it, the non-diagnostic images of the pilot and the stage's seconds)."""
    out = {}
    for key, rows in stages.items():
        group, _, threat = key.rpartition(" @ ")
        out[(group, threat)] = [{"stage": r["stage"], "met": r["met"], "standing": r["standing"],
                                 "S": r["standing"] / r["pool"] if r["pool"] else 1.0,
                                 "c": r["seconds"] / r["met"] if r["met"] else 0.0} for r in rows]
    return out


def _random_weights_suspected(table) -> bool:
    """Every group's clean accuracy at chance or below, or nothing standing after the first attack: what random
    CIFAR-size weights give."""
    chance = 100.0 / max(len(set(table.labels)), 2)
    cells = [table.cell(f"{g}: worst case", CLEAN, t) for g in table.group_names() for t in table.threats]
    return all(c is None or c["mean"] is None or c["mean"] <= chance + 5 for c in cells)

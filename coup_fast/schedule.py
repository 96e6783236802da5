"""The order of an evaluation's work, and the cascade that attacks only the images still standing.

A defense group (one defense attacked with each of its gradients: 'coup', 'coup@bpda', ...) under one threat model
has *stages*, (row, attack) pairs: the clean column first, then every row x attack (the attacks that fix their own
gradient, bpda-eot, and the clean column once per group, in its first row).  Its images come in batches; one batch's
stages form a *chain*.

- `full`: every stage attacks every image: complete per-row tables.
- `cascade` (the default): stage s of a chain attacks only the images of the batch that are still robust under
  Worst-of-R after stages 0 .. s-1 (all R purifications of every kept candidate correct), and the first
  `diag_images` images of the run, which every stage attacks so that the gradient-masking checks can compare rows on
  the same images.  An image is dropped only once one of its candidates was misclassified in one of R evaluations, and
  no later attack can make it robust again, so the worst case's Worst-of-R is exact; its Avg and MV become upper
  bounds, and a row's own cells are computed on the images it attacked (coup_fast.table marks both).

Per-image randomness (purify's `rows`, the attacks' `draws`) makes an image's attack and evaluation draw the same
numbers whichever other images share its batch, so the cascade's stages reproduce, image by image, what the full
schedule computes (to the networks' round-off across batch sizes), except AutoAttack ('aa*'), whose own
subset logic draws by the batch it is given (distribution, not bits, agree there).

**Order.**  Within a chain, stages run by their expected cost per broken image, cost / p, cheapest first (the rule
that minimises the expected cost of a sequence of independent tests): cost = the stage's planned solver steps per
image (coup_fast.plan.attack_work) weighted by RELATIVE_STEP_COST, and p = STRENGTH, the share of the images still
standing that the attack broke alone on the digits evaluation (docs/design.md §12 lists the measurements).  Ties keep
the declared order of rows and attacks.  The order is declared, not measured at run time, so that it is the same on
every run and rank (records of a chain depend on it) — `--pilot` measures how well it does.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import plan
from .attacks import OWN_GRADIENT
from .table import CLEAN

SCHEDULES = ("cascade", "full")
# Seconds of one solver step per image row relative to a purification step, per kind of call (digits models, one
# CPU thread, B = 32: plan.measure_step_seconds; the exact gradient recomputes each step's networks with their
# double backward).  Only the ratios matter.
RELATIVE_STEP_COST = {"purify": 1.0, "bpda": 1.05, "exact": 2.9, "detached-guidance": 1.9, "adjoint": 2.8,
                      "exact-bf16": 2.9}
# The share of the images standing after the clean column that each attack broke (Worst-of-R) on its own, averaged
# over the purifier rows of the digits default run under --schedule full (n = 32, R = 10; docs/design.md §12).
# aa and aa-standard, not in that run, count as aa-rand; any other attack without a measurement as DEFAULT_STRENGTH.
STRENGTH = {"apgd-ce": 0.37, "pgd-eot": 0.46, "aa-rand": 0.19, "aa": 0.19, "aa-standard": 0.19}
DEFAULT_STRENGTH = 0.5


@dataclass(frozen=True)
class Task:
    """One unit of work and its record: kind 'attack' (a stage of a chain), 'consistency' or 'large-eps'."""

    kind: str
    label: str
    what: str  # the attack (CLEAN for the clean column), or the check's name
    threat: str
    batch: int = 0


@dataclass(frozen=True)
class Chain:
    """One batch of one defense group under one threat: its stages in the order they run."""

    group: str
    threat: str
    batch: int
    stages: tuple  # Tasks of kind 'attack'


def stage_cost(attack: str, gradient: str, settings, n_eval: int, randomized: bool, n_steps: int, model=None) -> float:
    """Relative cost per image of one stage: its planned calls (evaluation included) x steps x RELATIVE_STEP_COST."""
    work = plan.attack_work(attack, settings, n_eval, randomized, model)
    total = 0.0
    for (kind, _), count in work.calls:
        kind = gradient if kind == plan.GRADIENT else kind
        total += count * RELATIVE_STEP_COST.get(kind, RELATIVE_STEP_COST["exact"])
    return total * n_steps


def stage_order(rows: list, attacks: list, cost) -> list:
    """The (row, attack) stages of one group in the order they run: the clean column first (in the first row), then
    every row x attack (own-gradient attacks in the first row only) by cost(row, attack) / STRENGTH, cheapest first;
    ties keep the rows' and attacks' declared order."""
    first = rows[0]
    pairs = [(row, attack) for row in rows for attack in attacks if row == first or attack not in OWN_GRADIENT]
    keyed = sorted(enumerate(pairs), key=lambda ip: (cost(*ip[1]) / STRENGTH.get(ip[1][1], DEFAULT_STRENGTH), ip[0]))
    return [(first, CLEAN)] + [pair for _, pair in keyed]


def chains(groups: dict, order: dict, threats: list, n_batches: int) -> list:
    """Every chain: per threat, group and batch, its stages in `order[(group, threat)]`."""
    out = []
    for threat in threats:
        for group in dict.fromkeys(groups.values()):
            for batch in range(n_batches):
                stages = tuple(Task("attack", row, attack, threat, batch) for row, attack in order[(group, threat)])
                out.append(Chain(group, threat, batch, stages))
    return out


def survivors(images: list, kept_robust) -> list:
    """The images of `images` (batch-local indices) whose kept candidate was correct in all R evaluations."""
    return [i for i, ok in zip(images, kept_robust) if ok]


def stage_images(schedule: str, width: int, standing: set, always: set) -> list:
    """The batch-local images a stage attacks: all under 'full'; under 'cascade' those still standing and the
    diagnostic images (`always`)."""
    if schedule == "full":
        return list(range(width))
    return sorted(standing | always)

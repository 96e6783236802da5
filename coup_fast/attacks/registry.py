"""The attacks by name: what runs, what it returns, and where its algorithm and default budget come from.

Adding an attack is a module in this package with a `run(model, x, y, *, norm, eps, seed, settings, draws)` that returns
{candidate name: adversarial batch} (every batch inside the eps-ball and [0, 1]), its budget's fields in
common.AttackSettings (defaults: the literature's), and one line in REGISTRY.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import aa, apgd, bpda, diffattack, diffhammer, pgd
from .aa import AA_VERSIONS
from .common import DEFAULT_EPS, NORMS, AttackSettings


@dataclass(frozen=True)
class Attack:
    """One attack: `run` (see the module docstring), `candidates(settings)` (how many batches run returns, each
    re-purified R times by the evaluation), the `source` of its algorithm and budget, the AttackSettings fields
    of its budget, and `gradient`, the attacker gradient it fixes itself whatever the row's (None: the row's)."""

    name: str
    run: Callable
    candidates: Callable
    source: str
    fields: tuple
    gradient: str | None = None


REGISTRY = {a.name: a for a in (
    Attack("apgd-ce", apgd.run, lambda s: 2 * s.n_restarts,
           "Croce & Hein, ICML 2020 (APGD-CE; pyautoattack): 100 iterations, 1 restart",
           ("n_iter", "n_restarts", "apgd_eot")),
    Attack("aa", aa.runner(AA_VERSIONS["aa"]), lambda s: 2,
           "Croce & Hein, ICML 2020 (AutoAttack standard and rand, pyautoattack); the COUP paper's protocol (worse "
           "of the two per image), rand's EOT 20 as DiffPure runs it",
           ("n_iter", "eot", "n_restarts", "fab_iter", "square_queries", "n_target_classes")),
    Attack("aa-standard", aa.runner(AA_VERSIONS["aa-standard"]), lambda s: 1,
           "Croce & Hein, ICML 2020: AutoAttack 'standard' (APGD-CE, APGD-T, FAB-T, Square)",
           ("n_iter", "n_restarts", "fab_iter", "square_queries", "n_target_classes")),
    Attack("aa-rand", aa.runner(AA_VERSIONS["aa-rand"]), lambda s: 1,
           "Croce & Hein, ICML 2020: AutoAttack 'rand' (APGD-CE, APGD-DLR with EOT 20)", ("n_iter", "eot")),
    Attack("pgd-eot", pgd.run, lambda s: 2,
           "Madry et al., ICLR 2018 (PGD) with Athalye et al., ICML 2018 (EOT); losses: Carlini & Wagner 2017's "
           "margin, Croce & Hein 2020's DLR; the lee-kim protocol: 200 x EOT 20",
           ("pgd_iter", "pgd_step", "pgd_step_scale", "pgd_eot", "pgd_random_start", "loss")),
    Attack("bpda-eot", bpda.run, lambda s: 2,
           "Athalye et al., ICML 2018 (BPDA + EOT); COUP paper Table 3: PGD-20, step 0.007 at L-inf 8/255",
           ("bpda_iter", "bpda_step", "bpda_eot", "loss"), gradient="bpda"),
    Attack("diffattack", diffattack.run, lambda s: 2 * len(diffattack.ROUNDS),
           "Kang, Song & Li, NeurIPS 2023 (DiffAttack), Sec. 3 and App. D: APGD on CE then DLR plus lambda = 1 times "
           "the deviated-reconstruction loss over the reverse states, 100 iterations x EOT 20",
           ("diffattack_iter", "diffattack_eot", "diffattack_lambda", "diffattack_steps")),
    Attack("diffhammer", diffhammer.run, lambda s: 2 * s.diffhammer_restarts,
           "Wang, Fu, Han & Xiang, NeurIPS 2024 (DiffHammer; code github.com/Ka1b0/DiffHammer): EM over N = 10 "
           "paths, gradient grafting, stepwise EM alpha = 0.5, APGD 3 restarts x 50 iterations (margin, CE, DLR)",
           ("diffhammer_iter", "diffhammer_restarts", "diffhammer_n", "diffhammer_alpha", "diffhammer_em_lam")),
)}
ATTACKS = tuple(REGISTRY)
# Attacks that fix the attacker's gradient themselves, whatever the defense row's gradient is.
OWN_GRADIENT = {a.name: a.gradient for a in REGISTRY.values() if a.gradient is not None}


def check_attack(name: str) -> "Attack":
    if name not in REGISTRY:
        raise ValueError(f"attack: expected one of {ATTACKS}, got {name!r}")
    return REGISTRY[name]


def run_attack(name, model, x, y, *, norm="Linf", eps=None, seed=0, settings=AttackSettings(), draws=None) -> dict:
    """Run attack `name` (one of ATTACKS): {candidate name: adversarial batch}.

    The evaluation keeps, per image, the candidate whose re-evaluation is worst: for 'aa' that is the
    worse of AutoAttack standard and rand (the paper counts a sample robust only if it survives both).
    draws: the attack's random starts image by image (common.ImageDraws; AutoAttack draws its own).
    """
    attack = check_attack(name)
    if norm not in NORMS:
        raise ValueError(f"threat: expected one of {NORMS}, got {norm!r}")
    eps = DEFAULT_EPS[norm] if eps is None else eps
    return attack.run(model, x, y, norm=norm, eps=eps, seed=seed, settings=settings, draws=draws)


def candidate_count(name: str, settings: AttackSettings = AttackSettings()) -> int:
    """How many candidates `run_attack(name)` returns (the evaluation re-purifies each R times)."""
    return check_attack(name).candidates(settings)

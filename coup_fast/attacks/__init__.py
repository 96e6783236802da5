"""Attacks on purified classifiers, one module each, by name in `registry` (with their sources and budgets).

    apgd        apgd-ce          APGD-CE (Croce & Hein 2020) through pyautoattack
    aa          aa, aa-standard, aa-rand   AutoAttack through pyautoattack
    pgd         pgd-eot          PGD (Madry et al. 2018) + EOT (Athalye et al. 2018), loss ce / margin / dlr
    bpda        bpda-eot         BPDA + EOT (Athalye et al. 2018)
    diffattack  diffattack       DiffAttack (Kang et al. 2023): APGD + the deviated-reconstruction loss
    diffhammer  diffhammer       DiffHammer (Wang et al. 2024): EM over paths, gradient grafting
    common      settings, EOT batching (BatchedEOT), losses, projections, candidates, APGD's steps, diagnostics

A model is any callable from [0, 1] images (B, C, H, W) to logits (B, K).  Randomness comes from torch's global
RNG, so `torch.manual_seed` before a call reproduces it; or, image by image, from `draws` (common.ImageDraws:
an image's random start independent of the others in its batch, what an evaluation's cascade needs).

**Candidates.**  An attack on a stochastic defense cannot know which of its iterates is the strongest: its own
"is it fooled yet" checks are single purifications (or a few).  So each attack returns *candidates*, every one an
adversarial batch inside the eps-ball, and the evaluation (coup_fast.evaluate) re-purifies each candidate R times
and keeps, per image, the worst:

    attack        candidates
    pgd-eot       'final' (the last iterate) and 'best' (per image, the iterate whose EOT draws were
    bpda-eot      classified correctly least often, ties: the higher mean loss)
    apgd-ce       'adv' (APGD's x_best_adv: the last iterate that fooled one purification, else its start)
                  and 'max-loss' (x_best, the iterate of highest loss); per restart
    aa-standard   'standard', 'rand': each AutoAttack version's output, as pyautoattack returns it (the
    aa-rand, aa   clean image where its single-purification check found no adversarial example)
    diffattack    '<loss>-best', '<loss>-max-loss' per round (ce, then dlr)
    diffhammer    '<loss>-best', '<loss>-max-loss' per restart (margin, ce, dlr)
"""
from .aa import AA_VERSIONS, autoattack, build_autoattack
from .apgd import apgd_ce, apgd_ce_candidates
from .bpda import PAPER_BPDA_STEP, bpda_eot, bpda_eot_candidates, bpda_step
from .common import (DEFAULT_EPS, LOSSES, NORMS, AttackSettings, BatchedEOT, BestIterate, ImageDraws, apgd_ascent, attack_loss,
                     clip, dlr_loss, eot_grad, eot_loss_grad, evaluate_logits, gradient_consistency, is_randomized,
                     margin_loss, per_draw_gradients, project, sample_logits, to_box, with_gradient)
from .diffattack import diffattack_candidates
from .diffhammer import diffhammer_candidates
from .pgd import pgd_eot, pgd_eot_candidates
from .registry import ATTACKS, OWN_GRADIENT, REGISTRY, Attack, candidate_count, run_attack

__all__ = ["AA_VERSIONS", "ATTACKS", "Attack", "AttackSettings", "BatchedEOT", "BestIterate", "DEFAULT_EPS", "ImageDraws", "LOSSES",
           "NORMS", "OWN_GRADIENT", "PAPER_BPDA_STEP", "REGISTRY", "apgd_ascent", "apgd_ce", "apgd_ce_candidates",
           "attack_loss", "autoattack", "bpda_eot", "bpda_eot_candidates", "bpda_step", "build_autoattack",
           "candidate_count", "clip", "diffattack_candidates", "diffhammer_candidates", "dlr_loss", "eot_grad",
           "eot_loss_grad", "evaluate_logits", "gradient_consistency", "is_randomized", "margin_loss",
           "per_draw_gradients", "pgd_eot", "pgd_eot_candidates", "project", "run_attack", "sample_logits", "to_box",
           "with_gradient"]

"""Attack protocols of the literature: named budgets that `coup-fast eval --protocol` and `coup-fast paper sweep
--protocol` apply over a data set's preset, in the order given (--protocol a,b: b wins where both set a value);
flags and config values win over both.  Values are EvalConfig field names; steps are relative to eps (scaled
with it)."""
from __future__ import annotations

PROTOCOLS = {
    "lee-kim": ("Lee & Kim 2023, 'Robust evaluation of diffusion-based adversarial purification' (ICCV): PGD-EOT "
                "200 iterations x EOT 20 through the full (exact) gradient, step 0.007 at L-inf 8/255",
                dict(attacks=["pgd-eot"], pgd_iter=200, pgd_eot=20, pgd_step_scale=0.007 / (8 / 255),
                     pgd_random_start=True)),
    "rdc": ("Chen et al. 2024, 'Robust classification via a single diffusion model' (RDC, ICML): BIM (PGD from the "
            "clean image, Kurakin et al. 2017) 200 iterations x EOT 32 through the exact gradient; step 1/255 at "
            "8/255 (Kurakin et al.'s; RDC states iterations and EOT)",
            dict(attacks=["pgd-eot"], pgd_iter=200, pgd_eot=32, pgd_step_scale=1 / 8, pgd_random_start=False)),
    "diffhammer-n10": ("Wang et al. 2024, 'DiffHammer: rethinking the robustness of diffusion-based adversarial "
                       "purification' (NeurIPS): N = 10 resubmissions, Avg and Worst-of-N robustness (R = 10)",
                       dict(n_eval=10)),
    "diffattack": ("Kang, Song & Li 2023, 'DiffAttack: evasion attacks against diffusion-based adversarial "
                   "purification' (NeurIPS), App. D: APGD on CE then DLR plus the deviated-reconstruction loss "
                   "(lambda = 1) over the reverse states, 100 iterations x EOT 20 per round",
                   dict(attacks=["diffattack"], diffattack_iter=100, diffattack_eot=20, diffattack_lambda=1.0)),
    "diffhammer": ("Wang et al. 2024, 'DiffHammer' (NeurIPS), App. C.1.2 and its code: the selective EM attack over "
                   "N = 10 paths with gradient grafting, APGD 3 restarts x 50 iterations (margin, CE, DLR), "
                   "evaluated with N = 10 resubmissions",
                   dict(attacks=["diffhammer"], diffhammer_iter=50, diffhammer_restarts=3, diffhammer_n=10,
                        n_eval=10)),
    "strongest": ("coup_fast's digits study (issue 25, README): the three attacks that together lowered every "
                  "purifier's worst case most, in the cascade's order: PGD-EOT with Carlini & Wagner's margin (the "
                  "most images broken per gradient), then DiffAttack and DiffHammer at their papers' budgets (each "
                  "broke images the others missed); PGD-EOT at lee-kim's 200 x 20, R = 10",
                  dict(attacks=["pgd-eot", "diffattack", "diffhammer"], loss="margin", pgd_iter=200, pgd_eot=20,
                       pgd_step_scale=0.007 / (8 / 255), pgd_random_start=True, diffattack_iter=100,
                       diffattack_eot=20, diffattack_lambda=1.0, diffhammer_iter=50, diffhammer_restarts=3,
                       diffhammer_n=10, n_eval=10)),
    "paper": ("arXiv 2408.05900 (COUP), Sec. 5.1-5.2: AutoAttack standard and rand (EOT 20), worse of the two per "
              "image; BPDA+EOT PGD-20, step 0.007 at L-inf 8/255",
              dict(attacks=["aa", "bpda-eot"], n_iter=100, eot=20, fab_iter=100, square_queries=5000, bpda_iter=20,
                   bpda_eot=20)),
}

"""Gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019) on the first `diag_images` images of each
defense and threat, from the evaluation's records (coup_fast.evaluate runs them):

  G  the exact gradient is inconsistent across EOT draws: mean pairwise cosine of `diag_draws` single-draw
     gradients below COSINE_MIN, or zero gradients on most images;
  S  a surrogate gradient (detached-guidance, adjoint, bpda, bpda-eot, ...) beats the exact one: per image, the worst
     Avg over the gradient-following attacks is lower for the surrogate on significantly more images (one-sided sign
     test, p < SIGN_P);
  E  an unbounded attack (PGD-EOT from the clean image, eps = 1 under L-inf, the box's diameter sqrt(d) under L2)
     with one of the rows' gradients leaves Avg accuracy above LARGE_EPS_MAX %.

S compares rows image by image, so it needs every row attacked on the same images: under a cascade schedule only the
diagnostic images are (they are never skipped), and S uses those; under the full schedule, every image.
A fired check is marked next to the numbers it concerns and listed in `Table.warnings()`.
"""
from __future__ import annotations

import torch

from . import stats
from .attacks import OWN_GRADIENT
from .table import Table, kept_verdicts

COSINE_MIN = 0.1      # G fires below this mean pairwise cosine (K draws' EOT mean is then mostly noise for K < 10)
SIGN_P = 0.05         # S fires below this one-sided sign-test p-value
LARGE_EPS_MAX = 10.0  # E fires when the unbounded attack leaves more Avg accuracy (%) than this
DIAG_ITER = 20        # iterations of the unbounded attack


def surrogates(table: Table, group: str, threat: str) -> list:
    """Each non-exact gradient of the group against the exact row: per image the worst Avg over the attacks that
    follow that gradient (bpda-eot counts for 'bpda'), compared with a one-sided sign test on the images every
    compared row attacked (module docstring).  Nothing for a defense with one gradient only (a bare classifier: its
    bpda-eot is plain PGD)."""
    if group in table.meta.get("one_gradient", ()):
        return []
    members = table.members(group)
    exact = next((d for d in members if (d.partition("@")[2] or "exact") == "exact"), None)
    following = [a for a in table.attacks if a not in OWN_GRADIENT]
    compared = None
    if table.meta.get("schedule") == "cascade":
        n = len(table.labels)
        compared = torch.arange(n) < min(table.meta.get("diag_images", n), n)

    def worst(rows_attacks):
        accs = [table.samples[(r, a, threat)].acc for r, a in rows_attacks if (r, a, threat) in table.samples]
        if not accs:
            return None
        acc = torch.stack(accs).min(0).values
        return acc if compared is None else acc[compared]

    if exact is None:
        return []
    base = worst([(exact, a) for a in following])
    if base is None:
        return []
    out = []
    gradients = {d.partition("@")[2]: d for d in members if d.partition("@")[2]}
    own = {g for a, g in OWN_GRADIENT.items() if a in table.attacks}
    for gradient in dict.fromkeys([*gradients, *own]):
        cells = [(gradients[gradient], a) for a in following] if gradient in gradients else []
        cells += [(members[0], a) for a, g in OWN_GRADIENT.items() if g == gradient and a in table.attacks]
        acc = worst(cells)
        if acc is None:
            continue
        wins, losses = int((acc < base).sum()), int((acc > base).sum())
        p = stats.sign_test(wins, losses)
        out.append({"gradient": gradient, "row": gradients.get(gradient, f"{members[0]} (bpda-eot)"),
                    "images": int(base.shape[0]), "exact_avg": 100 * float(base.mean()),
                    "surrogate_avg": 100 * float(acc.mean()), "wins": wins, "losses": losses, "p": p,
                    "fired": bool(wins > losses and p < SIGN_P)})
    return out


def diagnose(table: Table, records: dict, threat: str) -> None:
    """Fill table.diagnostics[(group, threat)] from the check records {(kind, group or row, threat): record}."""
    for group in table.group_names():
        members = table.members(group)
        d = {"consistency": None, "surrogates": surrogates(table, group, threat), "large_eps": None,
             "rows": {"S": [], "E": []}, "why": {}, "fired": []}
        rec = records.get(("consistency", group, threat))
        if rec is not None:
            cosine, ratio, zero = (torch.tensor(rec[k], dtype=torch.float64) for k in ("cosine", "ratio", "zero"))
            d["consistency"] = {"images": len(rec["cosine"]), "draws": rec["n_eval"], "cosine": float(cosine.mean()),
                                "ratio": float(ratio.mean()), "zero_images": int(zero.sum())}
            if d["consistency"]["cosine"] < COSINE_MIN or 2 * int(zero.sum()) > len(rec["zero"]):
                d["fired"].append("G")
                d["why"]["G"] = (f"mean pairwise cosine {d['consistency']['cosine']:.3f} over {rec['n_eval']} draws "
                                 f"(< {COSINE_MIN}), zero gradients on {int(zero.sum())} of {len(rec['zero'])} images")
        beaten = [s for s in d["surrogates"] if s["fired"]]
        if beaten:
            d["fired"].append("S")
            d["rows"]["S"] = [s["row"] for s in beaten]
            d["why"]["S"] = "; ".join(f"{s['gradient']} leaves {s['surrogate_avg']:.1f} % against exact's "
                                      f"{s['exact_avg']:.1f} % (better on {s['wins']} images, worse on {s['losses']}, "
                                      f"sign test p = {s['p']:.2g})" for s in beaten)
        big = [(m, records.get(("large-eps", m, threat))) for m in members]
        big = [(m, r) for m, r in big if r is not None]
        if big:
            accs = {m: kept_verdicts(r)[0].double().mean(0) for m, r in big}
            worst = torch.stack(list(accs.values())).min(0).values
            d["large_eps"] = {"eps": big[0][1]["eps"], "rows": {m: 100 * float(a.mean()) for m, a in accs.items()},
                              "worst": 100 * float(worst.mean())}
            d["rows"]["E"] = [m for m, a in accs.items() if 100 * float(a.mean()) > LARGE_EPS_MAX]
            if d["rows"]["E"]:
                d["fired"].append("E")
                d["why"]["E"] = (f"PGD-EOT from the clean image at eps = {d['large_eps']['eps']:.3g} leaves "
                                 + ", ".join(f"{m} {d['large_eps']['rows'][m]:.1f} %" for m in d["rows"]["E"])
                                 + f" (> {LARGE_EPS_MAX} %: that gradient does not lead the attack; worst over the "
                                   f"gradients {d['large_eps']['worst']:.1f} %)")
        table.diagnostics[(group, threat)] = d

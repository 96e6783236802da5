"""The evaluation's tables: per image verdicts, accuracies with 95 % intervals, worst cases, and their files.

Three accuracies, each of the kept candidate's R purifications of an image (coup_fast.evaluate):

- **Avg**: the fraction of the R classified correctly, averaged over images: the accuracy of a deployment that
  purifies once (what one query of the defense returns).
- **MV** (majority vote): the image counts when more than half of the R are correct: the accuracy of a deployment
  that purifies R times and votes, as DensePure (Xiao et al. 2023) and DiffBreak's majority-vote evaluation
  (Kassis et al. 2025) do.
- **Worst-of-R**: the image counts when all R are correct (DiffHammer's N-evaluation, Wang et al. 2024): an
  attacker who may resubmit R times breaks it otherwise.

Intervals (coup_fast.stats): Wilson for the MV and Worst-of-R fractions of images, the Korn-Graubard effective-size
Wilson interval for Avg means.

**Subsets** (`--schedule cascade`, coup_fast.schedule): a later row x attack attacks only the images still robust
under Worst-of-R, so its own cells are computed on a subset (marked, with the count), and a worst case's Avg and MV
are upper bounds (the attacks it skipped could only have lowered them; marked ≤).  Its Worst-of-R is exact: an
image skipped was already broken.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field

import torch

from . import stats
from ._files import atomic_write_text

CLEAN = "clean"  # the pseudo-attack of the clean-accuracy column
ALL = "all attacks"  # the column: per image the worst of the clean image and every attack
CHECKS = {"G": "the exact gradient is inconsistent across EOT draws",
          "S": "a surrogate gradient beats the exact one",
          "E": "an unbounded attack with some attacker gradient does not break it"}
OUTPUT_FILES = ("results.json", "results.md", "results.csv", "samples.csv")


def select_worst(correct: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Per image the candidate classified correctly least often over its runs, ties broken by the higher loss.

    correct: (n_cand, runs, B) bool, loss: (n_cand, B).  Returns (B,) candidate indices."""
    counts = correct.sum(1).double()  # (n_cand, B)
    finite_loss = torch.nan_to_num(loss.double(), nan=-math.inf)
    # counts are integers: a loss (squashed into (0, 1)) only orders candidates with equal counts
    key = counts - torch.sigmoid(finite_loss) * 0.5
    return key.argmin(0)


def kept_verdicts(record: dict):
    """(runs, m) verdicts of the candidate kept per image of an attack or large-eps record (m: the images it
    attacked), and (m,) the kept candidates' indices."""
    correct = torch.tensor(record["correct"], dtype=torch.bool).view(len(record["candidates"]), record["n_eval"], -1)
    chosen = select_worst(correct, torch.tensor(record["loss"], dtype=torch.float64).view(correct.shape[0], -1))
    return correct[chosen, :, torch.arange(correct.shape[2])].T, chosen


@dataclass
class Verdicts:
    """Per image of one (row, attack, threat): the kept candidate's R verdicts (runs, N), its name (N; '' where the
    image was not attacked), and which images were attacked (N,) bool (all of them unless a schedule skipped some)."""

    correct: torch.Tensor
    candidate: list
    attacked: torch.Tensor | None = None

    def __post_init__(self):
        if self.attacked is None:
            self.attacked = torch.ones(self.correct.shape[1], dtype=torch.bool)

    @property
    def acc(self) -> torch.Tensor:
        """(N,) fraction of the R correct; +inf where not attacked (neutral in a minimum over attacks)."""
        return torch.where(self.attacked, self.correct.double().mean(0), math.inf)

    @property
    def robust(self) -> torch.Tensor:
        """(N,) all R correct; False where not attacked (skipped because an earlier attack broke it)."""
        return self.correct.all(0) & self.attacked


def worst_label(group: str) -> str:
    """The label of a group's worst-case row."""
    return f"{group}: worst case"


def _stats(acc: torch.Tensor, robust: torch.Tensor, runs: int, attacked: torch.Tensor, complete: bool) -> dict:
    """The cell of per-image accuracies over the attacked images.  complete=False: some image missed some attack
    (a worst case under a cascade): Avg and MV are upper bounds."""
    n_all = int(attacked.shape[0])
    acc, robust = acc[attacked], robust[attacked]
    n = int(acc.shape[0])
    pct = lambda v: 100.0 * float(v)  # noqa: E731
    out = {"n": n, "of": n_all, "runs": runs, "conditional": n < n_all, "upper_bound": not complete}
    if n == 0:  # a cascade left no image to attack: no number (None, valid JSON, unlike NaN)
        return {**out, **dict.fromkeys(("mean", "mean_lo", "mean_hi", "mv", "mv_lo", "mv_hi", "worst", "worst_lo",
                                        "worst_hi"))}
    k = int(robust.sum())
    majority = int((acc > 0.5).sum())
    mean_lo, mean_hi = stats.mean_interval(acc.tolist(), runs)
    worst_lo, worst_hi = stats.wilson_interval(k, n)
    mv_lo, mv_hi = stats.wilson_interval(majority, n)
    return {**out, "mean": pct(acc.mean()), "mean_lo": pct(mean_lo), "mean_hi": pct(mean_hi),
            "mv": pct(majority / n), "mv_lo": pct(mv_lo), "mv_hi": pct(mv_hi),
            "worst": pct(k / n), "worst_lo": pct(worst_lo), "worst_hi": pct(worst_hi)}


@dataclass
class Table:
    """Accuracies (%) per (row, column, threat): Avg, MV and Worst-of-R with 95 % intervals; worst-case rows per group.

    defenses: the rows' labels; groups: {label: defense group}; samples: {(label, attack, threat): Verdicts} for
    every row and attack (CLEAN included); diagnostics: {(group, threat): the masking checks}.  Worst-case rows are
    labelled worst_label(group) and computed from the samples.
    """

    defenses: list
    attacks: list
    threats: list
    eps: dict
    groups: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)  # y of the images, for samples.csv
    meta: dict = field(default_factory=dict)

    @property
    def columns(self) -> list:
        return [CLEAN, *self.attacks, ALL]

    def group_names(self) -> list:
        return list(dict.fromkeys(self.groups.get(d, d) for d in self.defenses))

    def members(self, group: str) -> list:
        return [d for d in self.defenses if self.groups.get(d, d) == group]

    def group_of(self, label: str) -> str:
        """The group of a row or of a worst-case row."""
        return {worst_label(g): g for g in self.group_names()}.get(label) or self.groups.get(label, label)

    def per_image(self, label: str, column: str, threat: str):
        """(acc (N,), robust (N,), runs, counted (N,), complete) of a row or worst-case row in a column: per image
        the minima over what it covers.  Column 'all attacks' (over the clean image and every attack) counts every
        image: one a schedule skipped at a later stage was broken at an earlier one, so it is not robust, and
        `complete` says whether every image met every stage (else Avg and MV are upper bounds).  One attack's column
        counts the images that every row it covers attacked with it (all of them under the full schedule)."""
        group = self.group_of(label)
        rows = self.members(group) if label == worst_label(group) else [label]
        cols = [CLEAN, *self.attacks] if column == ALL else [column]
        verdicts = [self.samples[(r, c, threat)] for r in rows for c in cols if (r, c, threat) in self.samples]
        if not verdicts:
            return None
        acc = torch.stack([v.acc for v in verdicts]).min(0).values
        robust = torch.stack([v.robust for v in verdicts]).all(0)
        runs = max(v.correct.shape[0] for v in verdicts)
        met = torch.stack([v.attacked for v in verdicts])
        if column == ALL:
            return acc, robust, runs, met.any(0), bool(met.all())
        return acc, robust, runs, met.all(0), True

    def cell(self, label: str, column: str, threat: str):
        """{n, of, runs, conditional, upper_bound, mean, mean_lo, mean_hi, mv, mv_lo, mv_hi, worst, worst_lo,
        worst_hi} (accuracies in %), or None when nothing ran there."""
        got = self.per_image(label, column, threat)
        return None if got is None else _stats(*got)

    @property
    def cells(self) -> dict:
        out = {}
        for threat in self.threats:
            for label in [*self.defenses, *map(worst_label, self.group_names())]:
                for column in self.columns:
                    c = self.cell(label, column, threat)
                    if c is not None:
                        out[(label, column, threat)] = c
        return out

    def marks(self, label: str, threat: str) -> str:
        """The fired checks of a row ('S', 'G,E', ...) or ''."""
        group = self.group_of(label)
        diag = self.diagnostics.get((group, threat))
        if diag is None:
            return ""
        if label == worst_label(group):
            fired = diag["fired"]
        else:
            gradient = label.partition("@")[2] or "exact"
            fired = [c for c in ("G", "S", "E") if label in diag["rows"].get(c, ()) or
                     (c == "G" and gradient == "exact" and "G" in diag["fired"])]
        return ",".join(fired)

    def rows(self):
        for threat in self.threats:
            for label in [*self.defenses, *map(worst_label, self.group_names())]:
                group = self.group_of(label)
                for column in self.columns:
                    c = self.cell(label, column, threat)
                    if c is not None:
                        yield {"threat": threat, "eps": self.eps[threat], "defense": label, "group": group,
                               "attack": column, **c, "checks": self.marks(label, threat) if column == ALL else ""}

    def to_dict(self) -> dict:
        diagnostics = [{"group": g, "threat": t, **d} for (g, t), d in self.diagnostics.items()]
        return {"defenses": self.defenses, "groups": self.groups, "attacks": self.attacks, "threats": self.threats,
                "eps": self.eps, "rows": list(self.rows()), "diagnostics": diagnostics, "meta": self.meta}

    CSV_COLUMNS = ("threat", "eps", "defense", "group", "attack", "n", "of", "conditional", "upper_bound", "runs",
                   "mean", "mean_lo", "mean_hi", "mv", "mv_lo", "mv_hi", "worst", "worst_lo", "worst_hi", "checks")

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: row[k] for k in self.CSV_COLUMNS})
        return buf.getvalue()

    SAMPLES_COLUMNS = ("threat", "defense", "group", "attack", "image", "label", "runs", "correct", "candidate")

    def samples_csv(self) -> str:
        """Per image, row and attack that ran on it: R, how many of the R purifications of the kept candidate were
        correct, and which candidate.  A group's worst case is, per image, the minimum of correct / runs over its
        lines: exactly for Worst-of-R (an image a cascade skipped has a line with correct < runs), an upper bound
        for Avg and MV when some line is missing."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.SAMPLES_COLUMNS)
        for threat in self.threats:
            for label in self.defenses:
                for attack in [CLEAN, *self.attacks]:
                    v = self.samples.get((label, attack, threat))
                    if v is None:
                        continue
                    counts = v.correct.sum(0).tolist()
                    for i, (k, name) in enumerate(zip(counts, v.candidate)):
                        if not v.attacked[i]:
                            continue
                        y = self.labels[i] if i < len(self.labels) else ""
                        writer.writerow([threat, label, self.groups.get(label, label), attack, i, y,
                                         v.correct.shape[0], k, name])
        return buf.getvalue()

    # ----------------------------------------------------------------------------- markdown
    @staticmethod
    def _fmt(c, key: str) -> str:
        if c is None or c[key] is None:
            return "–"
        bound = "≤ " if c["upper_bound"] and key in ("mean", "mv") else ""
        subset = f" (n = {c['n']})" if c["conditional"] else ""
        return f"{bound}{c[key]:.1f} [{c[key + '_lo']:.1f}, {c[key + '_hi']:.1f}]{subset}"

    def headline(self) -> str:
        runs = self.meta.get("n_eval", "R")
        out = [f"**Robust accuracy, worst case over attacks x attacker gradients** (n = {self.meta.get('n', '?')} "
               f"images, R = {runs} purifications of each adversarial example; %, 95 % interval over images; clean "
               "and robust in the same three metrics: Avg = one purification, MV = majority of R, Worst-of-R = all R)",
               "", "| Defense | threat | rows (attacker gradients) | Clean Avg | Clean Worst-of-R | Robust Avg | "
                   "Robust MV | Robust Worst-of-R | checks |",
               "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for threat in self.threats:
            for group in self.group_names():
                label = worst_label(group)
                robust = self.cell(label, ALL, threat)
                if robust is None:
                    continue
                clean = self.cell(label, CLEAN, threat)
                gradients = ", ".join(d.partition("@")[2] or "exact" for d in self.members(group))
                marks = self.marks(label, threat)
                out.append(f"| **{group}** | {threat} | {gradients} | {self._fmt(clean, 'mean')} | "
                           f"{self._fmt(clean, 'worst')} | {self._fmt(robust, 'mean')} | {self._fmt(robust, 'mv')} | "
                           f"**{self._fmt(robust, 'worst')}** | {'⚠ ' + marks if marks else ''} |")
        return "\n".join(out)

    def _grid(self, threat: str, key: str) -> list:
        head = ["Defense", *self.columns]
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for group in self.group_names():
            members = self.members(group)
            labels = ([worst_label(group)] if len(members) > 1 else []) + members
            for label in labels:
                vals = []
                for column in self.columns:
                    v = self._fmt(self.cell(label, column, threat), key)
                    marks = self.marks(label, threat) if column == ALL else ""
                    vals.append(v + (f" ⚠{marks}" if marks else ""))
                bold = label == worst_label(group) or len(members) == 1
                out.append("| " + " | ".join([f"**{label}**" if bold else label, *vals]) + " |")
        return out

    def diagnostics_markdown(self, threat: str) -> list:
        rows = [(g, d) for (g, t), d in self.diagnostics.items() if t == threat]
        if not rows:
            return []
        out = ["Gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019), on the first "
               f"{self.meta.get('diag_images', '?')} images:", "",
               "| Defense | exact gradient over draws: mean cosine / norm ratio | surrogate vs exact (Avg %, sign test) "
               "| unbounded attack, Avg % per row | fired |", "|---|---|---|---|---|"]
        for group, d in rows:
            c = d.get("consistency")
            if c is None:
                cons = "deterministic"
            else:
                zero = f", {c['zero_images']} images with zero gradients" if c["zero_images"] else ""
                cons = f"{c['cosine']:.2f} / {c['ratio']:.2f} ({c['draws']} draws{zero})"
            surr = "; ".join(f"{s['gradient']} {s['surrogate_avg']:.1f} vs {s['exact_avg']:.1f} (p = {s['p']:.2g})"
                             for s in d["surrogates"]) or "–"
            big = d.get("large_eps")
            unbounded = "–" if big is None else (", ".join(f"{lab}: {a:.1f}" for lab, a in big["rows"].items())
                                                + f" (eps = {big['eps']:.3g})")
            out.append(f"| {group} | {cons} | {surr} | {unbounded} | {','.join(d['fired']) or '–'} |")
        return out + [""]

    def _schedule_note(self) -> list:
        schedule = self.meta.get("schedule")
        if schedule != "cascade":
            return []
        return ["Schedule 'cascade': each later row x attack attacked only the images still robust under Worst-of-R "
                "(the first diagnostic images excepted); a cell marked (n = k) was computed on those k images; a worst "
                "case's Worst-of-R is exact, its Avg and MV (marked ≤) are upper bounds.  Order, per defense: "
                + "; ".join(f"{group}: {', '.join(stages)}" for group, stages in self.meta.get("order", {}).items()),
                ""]

    def to_markdown(self) -> str:
        runs = self.meta.get("n_eval", "R")
        out = [self.headline(), ""] + self._schedule_note()
        for threat in self.threats:
            out.append(f"**{threat}, eps = {self.eps[threat]:.4g}**  (n = {self.meta.get('n', '?')}, R = {runs})\n")
            for key, title in (("worst", "Worst-of-R (%): an image counts if all R purifications of its worst candidate "
                                         "are correct [95 % Wilson interval]"),
                               ("mv", "MV (%): an image counts if more than half of those R purifications are correct "
                                      "(majority vote) [95 % Wilson interval]"),
                               ("mean", "Avg (%): the fraction of those R purifications that are correct, averaged "
                                        "over images [95 % Korn-Graubard interval]")):
                out += [title, ""] + self._grid(threat, key) + [""]
            out += self.diagnostics_markdown(threat)
        legend = "; ".join(f"⚠{k}: {v}" for k, v in CHECKS.items())
        out.append(f"'GROUP: worst case' = per image the worst over every attack x attacker gradient of that defense "
                   f"(and the clean image); 'all attacks' = the same within a row; name@gradient = the attacker "
                   f"differentiates with that gradient; clean and bpda-eot do not depend on it (shared by a group's "
                   f"rows); 'aa' = worse of AutoAttack standard and rand per image.  {legend}.")
        return "\n".join(out)

    def warnings(self) -> list:
        """One line per fired gradient-masking check."""
        lines = []
        for (group, threat), d in self.diagnostics.items():
            for code in d["fired"]:
                lines.append(f"{group} ({threat}): ⚠{code} {CHECKS[code]}: {d['why'][code]}")
        return lines

    def __str__(self) -> str:
        return self.to_markdown()

    def save(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        for name, text in (("results.json", json.dumps(self.to_dict(), indent=1)),
                           ("results.md", self.to_markdown() + "\n"), ("results.csv", self.to_csv()),
                           ("samples.csv", self.samples_csv())):
            atomic_write_text(os.path.join(out_dir, name), text)

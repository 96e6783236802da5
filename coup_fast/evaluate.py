"""Robustness evaluation: defenses x attacks x threat models -> accuracy tables (paper Tables 1-3).

`evaluate(models, x, y, ...)` is the one call.  A model is any callable from [0, 1] images to
logits (AutoAttack / RobustBench); `build_defense` turns a `Defense` spec into one (a bare
classifier or a `PurifiedClassifier`).

**Randomness.**  A purified classifier draws fresh noise on every call.  Every attack returns
candidates (coup_fast.attacks: final and best iterates, each AutoAttack version's output); each
candidate is purified R = `n_eval` times, and per image the candidate whose R purifications are
classified correctly least often is kept (ties: the higher mean cross-entropy).  An image's
accuracy is then reported two ways (DiffHammer's N-evaluation): **Avg**, the fraction of its R
purifications classified correctly, and **Worst-of-R**, 1 if all R are correct, else 0.  The
selection uses the same R purifications it reports: an attacker allowed to query the defense would
choose so, and the bias this leaves is towards the attacker (a conservative robustness number).

**The worst case.**  The rows of one defense (its group: 'coup', 'coup@detached-guidance',
'coup@adjoint', 'coup@bpda') are the same purifier attacked with different gradients.  Its
"worst case" row counts an image robust only if it survives every attack x gradient that ran
(AutoAttack's worst-case principle extended over gradients): per image the minimum of the
accuracies, Avg and Worst-of-R alike.  The column "all attacks" of a row does the same over its
own attacks and the clean image (a point of the ball too, so robust accuracy <= clean accuracy per
image).  Attacks that fix their own gradient (bpda-eot) and the clean image do not depend on the
row's gradient: they run once per group, in its first row, and are shared by its other rows.

**Confidence intervals** (95 %, over images; coup_fast.stats): Wilson for Worst-of-R fractions, the
Korn-Graubard effective-size Wilson interval for Avg means.

**Gradient-masking checks** (Athalye et al. 2018; Carlini et al. 2019), on the first `diag_images`
images of each defense and threat:
  G  the exact gradient is inconsistent across EOT draws: mean pairwise cosine of `diag_draws`
     single-draw gradients below COSINE_MIN, or zero gradients on most images;
  S  a surrogate gradient (detached-guidance, adjoint, bpda, bpda-eot) beats the exact one: per image,
     the worst Avg over the gradient-following attacks is lower for the surrogate on significantly
     more images (one-sided sign test, p < SIGN_P);
  E  an unbounded attack (PGD-EOT from the clean image, eps = 1 under L-inf, the box's diameter
     sqrt(d) under L2) with one of the rows' gradients leaves Avg accuracy above LARGE_EPS_MAX %.
A fired check is marked next to the numbers it concerns and listed in `Table.warnings()`.

**Files** (out_dir): every (task, batch) result is its own JSON record, written atomically (tmp
file + os.replace) under a hash of the settings; finished records are checked against their own
index, width, R and hash and skipped on restart; an unreadable or inconsistent record is reported
by path, renamed *.unreadable (never deleted) and recomputed; temporary files a crash left are
removed.  Each batch is seeded from (seed, cell, batch index) alone, so results do not depend on
what ran before, on restarts, or on how batches are spread over ranks.  Under torch.distributed
the tasks are dealt round-robin to the ranks; after a barrier every rank reads all records and
rank 0 writes results.{json,md,csv} and samples.csv (per image, row and attack: R, the number of
the R purifications classified correctly and the candidate kept; the worst case is the minimum
over a group's lines).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import stats
from ._files import atomic_write_text
from .attacks import (AttackSettings, DEFAULT_EPS, NORMS, OWN_GRADIENT, evaluate_logits, gradient_consistency,
                      is_randomized, per_draw_gradients, pgd_eot_candidates, run_attack, with_gradient)
from .lm import LMConfig, index_eps_model
from .purify import GRADIENTS, PurifiedClassifier
from .sde import ReverseGrid
from .solver import LM_MODE

DEFENSES = ("none", "diffpure", "reverse", "coup", "lm", "coup-lm")
SDE_DEFENSES = ("diffpure", "reverse", "coup")
LM_DEFENSES = ("lm", "coup-lm")  # Sec. 5.2.1: likelihood maximization (Chen et al. 2023) without / with guidance
# What the attacker may differentiate with (purify's `gradient`); 'adjoint' is the published attack; 'exact-bf16' the
# exact gradient with the networks under bf16 autocast (cheaper; its candidates are evaluated in full precision).
ATTACK_GRADIENTS = ("exact", "detached-guidance", "adjoint", "bpda", "exact-bf16")
CLEAN = "clean"  # the pseudo-attack of the clean-accuracy column
ALL = "all attacks"  # the column: per image the worst of the clean image and every attack
MODE = {"diffpure": "diffpure", "reverse": "reverse", "coup": "coup", "lm": LM_MODE, "coup-lm": LM_MODE}
CHECKS = {"G": "the exact gradient is inconsistent across EOT draws",
          "S": "a surrogate gradient beats the exact one",
          "E": "an unbounded attack with some attacker gradient does not break it"}
COSINE_MIN = 0.1      # G fires below this mean pairwise cosine (K draws' EOT mean is then mostly noise for K < 10)
SIGN_P = 0.05         # S fires below this one-sided sign-test p-value
LARGE_EPS_MAX = 10.0  # E fires when the unbounded attack leaves more Avg accuracy (%) than this
DIAG_ITER = 20        # iterations of the unbounded attack
RECORD_VERSION = 2    # the record layout (candidates, R x B verdicts); part of the settings hash


@dataclass(frozen=True)
class Defense:
    """A defense and the gradient its attacker uses.  name: one of DEFENSES.

    lm: the likelihood-max settings of 'lm' / 'coup-lm' (coup_fast.lm.LMConfig; its lam is ignored: 'lm' runs
    without guidance, 'coup-lm' with `lam`).  t_star, dt and diffusion apply to the SDE defenses only.  clamp:
    purify's `clamp` (None: the mode's default; DiffPure unclamped, as NVlabs' code runs it).
    """

    name: str
    t_star: float = 0.1
    lam: float = 1.0
    dt: float = 1e-3
    gradient: str = "exact"
    diffusion: str = "ddpm"  # DiffPure's forward marginal (purify's `diffusion`)
    lm: LMConfig = LMConfig()
    clamp: bool | None = None  # the purified image clamped to [0, 1] (purify's clamp; None: the mode's default)

    @property
    def label(self) -> str:
        """Row label: the name, plus '@gradient' when the attacker does not use the exact one."""
        return self.name if self.gradient == "exact" or self.name == "none" else f"{self.name}@{self.gradient}"

    @staticmethod
    def parse(spec: str, **settings) -> "Defense":
        """'coup' or 'coup@detached-guidance' (name@attacker-gradient) -> Defense."""
        if not isinstance(spec, str):
            raise ValueError(f"defenses: expected a defense name, got {spec!r} ({type(spec).__name__})")
        name, _, gradient = spec.partition("@")
        if name not in DEFENSES:
            raise ValueError(f"defenses: unknown defense {name!r}; expected one of {DEFENSES} (optionally @gradient)")
        gradient = gradient or settings.pop("gradient", "exact")
        settings.pop("gradient", None)
        if gradient not in ATTACK_GRADIENTS:
            raise ValueError(f"defenses: unknown gradient {gradient!r} in {spec!r}; expected one of {ATTACK_GRADIENTS}")
        if name in LM_DEFENSES and gradient == "adjoint":
            raise ValueError(f"defenses: {spec!r}: 'adjoint' is the published attack on the SDE purifiers; {name} "
                             "takes exact, detached-guidance, bpda or exact-bf16")
        return Defense(name, gradient=gradient, **settings)


def build_defense(defense: Defense, score_model, classifier, engine: str = "auto", eps_model=None):
    """The model a Defense stands for: the bare classifier, or classifier(purify(x)) on `engine`.

    The LM defenses purify with an eps-network on the DDPM index: `eps_model`, or by default the score
    model through coup_fast.lm.index_eps_model (the shipped digits model is a continuous VP model)."""
    if defense.name == "none":
        return classifier
    assert defense.gradient in GRADIENTS
    if defense.name in LM_DEFENSES:
        eps_model = index_eps_model(score_model) if eps_model is None else eps_model
        return PurifiedClassifier(eps_model, classifier, mode=LM_MODE, lam=defense.lam if defense.name == "coup-lm" else 0.0,
                                  gradient=defense.gradient, engine=engine, lm=defense.lm, clamp=defense.clamp)
    return PurifiedClassifier(score_model, classifier, t_star=defense.t_star, lam=defense.lam, dt=defense.dt,
                              mode=MODE[defense.name], gradient=defense.gradient, engine=engine,
                              diffusion=defense.diffusion, clamp=defense.clamp)


def solve_steps(model) -> str | None:
    """The step count of a purified model, for progress output ('N = 5 SDE steps'); None for a bare classifier."""
    kw = getattr(model, "purify_kwargs", None)
    if kw is None:
        return None
    if kw.get("mode") == LM_MODE:
        return f"M = {(kw.get('lm') or LMConfig()).n_steps} LM steps"
    return f"N = {ReverseGrid.from_dt(kw.get('t_star', 0.1), kw.get('dt', 1e-3)).n_steps} SDE steps"


def batch_seed(seed: int, cell: tuple, batch: int) -> int:
    """A 62-bit seed from (seed, cell, batch index) only."""
    digest = hashlib.sha256(json.dumps([seed, list(cell), batch]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _weights_digest(model, memo: dict) -> str | None:
    """Digest of a module's parameters and buffers (None for a plain function): results computed
    with other weights must not be resumed.  memo: tensor id -> digest, as defenses share models."""
    if not isinstance(model, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in memo:
            memo[id(tensor)] = _tensor_digest(tensor.float() if tensor.dtype == torch.bfloat16 else tensor)
        h.update(f"{name}:{memo[id(tensor)]};".encode())
    return h.hexdigest()[:16]


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reevaluate(model, candidates: dict, y: torch.Tensor, runs: int, chunk: int | None = None):
    """Purify every candidate `runs` times: (names, correct (n_cand, runs, B) bool, mean cross-entropy (n_cand, B))."""
    correct, loss = [], []
    for x_adv in candidates.values():
        logits = evaluate_logits(model, x_adv, runs, chunk)  # (runs, B, C)
        correct.append(logits.argmax(-1) == y)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat(runs), reduction="none")
        loss.append(ce.view(runs, -1).mean(0))
    return list(candidates), torch.stack(correct), torch.stack(loss)


def select_worst(correct: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Per image the candidate classified correctly least often over its runs, ties broken by the higher loss.

    correct: (n_cand, runs, B) bool, loss: (n_cand, B).  Returns (B,) candidate indices."""
    counts = correct.sum(1).double()  # (n_cand, B)
    finite_loss = torch.nan_to_num(loss.double(), nan=-math.inf)
    # counts are integers: a loss (squashed into (0, 1)) only orders candidates with equal counts
    key = counts - torch.sigmoid(finite_loss) * 0.5
    return key.argmin(0)


# ----------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Task:
    """One unit of work and its record: kind 'attack' (a cell's batch), 'consistency' or 'large-eps'."""

    kind: str
    label: str
    what: str  # the attack, or the check's name
    threat: str
    batch: int = 0


_TMP = re.compile(r"\.tmp\d+$")  # what _files.atomic_write leaves behind when killed mid-write
OUTPUT_FILES = ("results.json", "results.md", "results.csv", "samples.csv")


def _remove_leftover_tmp(out_dir: str) -> list:
    """Delete the temporary files of interrupted atomic writes: under out_dir/batches, and of our outputs."""
    removed = []
    batches = os.path.join(out_dir, "batches")
    for dirpath, _, names in os.walk(batches):
        removed += [os.path.join(dirpath, n) for n in names if _TMP.search(n)]
    if os.path.isdir(out_dir):
        removed += [os.path.join(out_dir, n) for n in os.listdir(out_dir)
                    if _TMP.search(n) and _TMP.sub("", n) in (*OUTPUT_FILES, "config.json")]
    for path in removed:
        os.remove(path)
    return removed


def _set_aside(path: str) -> str:
    """Rename a bad record out of the way (never delete: it may be evidence) and return the new name."""
    aside, n = f"{path}.unreadable", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.unreadable{n}"
    os.replace(path, aside)
    return aside


def _as_tensor(value, shape: tuple, name: str, kind: str) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"its {name} is not a numeric array ({e})") from None
    if tuple(t.shape) != shape:
        raise ValueError(f"its {name} has shape {tuple(t.shape)}, expected {shape}")
    if kind == "binary" and not ((t == 0) | (t == 1)).all():
        raise ValueError(f"its {name} holds values other than 0 and 1")
    if kind == "number" and torch.isnan(t).any():
        raise ValueError(f"its {name} holds NaN")
    return t


def check_record(record, expect: dict) -> None:
    """Raise ValueError saying how `record` disagrees with what its path promises (`expect`) or its own shape."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but a {type(record).__name__}")
    for key, want in expect.items():
        if record.get(key) != want:
            raise ValueError(f"its {key} is {record.get(key)!r}, expected {want!r}")
    width, runs = expect["width"], expect["n_eval"]
    if expect["kind"] == "consistency":
        for key in ("cosine", "ratio"):
            _as_tensor(record.get(key), (width,), key, "number")
        _as_tensor(record.get("zero"), (width,), "zero", "binary")
        return
    names = record.get("candidates")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"its candidates are {names!r}, expected a non-empty list of names")
    _as_tensor(record.get("correct"), (len(names), runs, width), "correct", "binary")
    _as_tensor(record.get("loss"), (len(names), width), "loss", "number")
    if expect["kind"] == "large-eps":
        radius = record.get("eps")
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
            raise ValueError(f"its eps is {radius!r}, expected a radius > 0")


def read_record(path: str, expect: dict):
    """The record at `path` if it exists and agrees with `expect`; a bad one is reported, set aside, and None returned."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        check_record(record, expect)
        return record
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        aside = _set_aside(path)
        print(f"{path}: unreadable or inconsistent result record ({e}); moved to {aside}, recomputing it",
              file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------------ tables
@dataclass
class Verdicts:
    """Per image of one (row, attack, threat): the kept candidate's R verdicts (runs, N) and its name (N)."""

    correct: torch.Tensor
    candidate: list

    @property
    def acc(self) -> torch.Tensor:
        return self.correct.double().mean(0)

    @property
    def robust(self) -> torch.Tensor:
        return self.correct.all(0)


def worst_label(group: str) -> str:
    """The label of a group's worst-case row."""
    return f"{group}: worst case"


def _stats(acc: torch.Tensor, robust: torch.Tensor, runs: int) -> dict:
    n = int(acc.shape[0])
    k = int(robust.sum())
    mean_lo, mean_hi = stats.mean_interval(acc.tolist(), runs)
    worst_lo, worst_hi = stats.wilson_interval(k, n)
    pct = lambda v: 100.0 * float(v)  # noqa: E731
    return {"n": n, "runs": runs, "mean": pct(acc.mean()), "mean_lo": pct(mean_lo), "mean_hi": pct(mean_hi),
            "worst": pct(k / n), "worst_lo": pct(worst_lo), "worst_hi": pct(worst_hi)}


@dataclass
class Table:
    """Accuracies (%) per (row, column, threat): Avg and Worst-of-R with 95 % intervals; worst-case rows per group.

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
        """(acc (N,), robust (N,), runs) of a row or worst-case row in a column: minima over what it covers."""
        group = self.group_of(label)
        rows = self.members(group) if label == worst_label(group) else [label]
        cols = [CLEAN, *self.attacks] if column == ALL else [column]
        verdicts = [self.samples[(r, c, threat)] for r in rows for c in cols if (r, c, threat) in self.samples]
        if not verdicts:
            return None
        acc = torch.stack([v.acc for v in verdicts]).min(0).values
        robust = torch.stack([v.robust for v in verdicts]).all(0)
        return acc, robust, max(v.correct.shape[0] for v in verdicts)

    def cell(self, label: str, column: str, threat: str):
        """{n, runs, mean, mean_lo, mean_hi, worst, worst_lo, worst_hi} in %, or None when nothing ran there."""
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

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = ["threat", "eps", "defense", "group", "attack", "n", "runs", "mean", "mean_lo", "mean_hi", "worst",
                 "worst_lo", "worst_hi", "checks"]
        writer = csv.DictWriter(buf, names, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: row[k] for k in names})
        return buf.getvalue()

    def samples_csv(self) -> str:
        """Per image, row and attack: R, how many of the R purifications of the kept candidate were correct, and
        which candidate; the worst case of a group is the per-image minimum of correct / runs over its lines."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["threat", "defense", "group", "attack", "image", "label", "runs", "correct", "candidate"])
        for threat in self.threats:
            for label in self.defenses:
                for attack in [CLEAN, *self.attacks]:
                    v = self.samples.get((label, attack, threat))
                    if v is None:
                        continue
                    counts = v.correct.sum(0).tolist()
                    for i, (k, name) in enumerate(zip(counts, v.candidate)):
                        y = self.labels[i] if i < len(self.labels) else ""
                        writer.writerow([threat, label, self.groups.get(label, label), attack, i, y,
                                         v.correct.shape[0], k, name])
        return buf.getvalue()

    # ----------------------------------------------------------------------------- markdown
    def _fmt(self, c, key: str) -> str:
        if c is None:
            return "–"
        return f"{c[key]:.1f} [{c[key + '_lo']:.1f}, {c[key + '_hi']:.1f}]"

    def headline(self) -> str:
        runs = self.meta.get("n_eval", "R")
        out = [f"**Robust accuracy, worst case over attacks x attacker gradients** (n = {self.meta.get('n', '?')} "
               f"images, R = {runs} purifications of each adversarial example; %, 95 % interval over images)", "",
               "| Defense | threat | rows (attacker gradients) | Clean (Avg) | Robust Avg | Robust Worst-of-R | checks |",
               "|---|---|---|---:|---:|---:|---|"]
        for threat in self.threats:
            for group in self.group_names():
                label = worst_label(group)
                robust = self.cell(label, ALL, threat)
                if robust is None:
                    continue
                gradients = ", ".join(d.partition("@")[2] or "exact" for d in self.members(group))
                marks = self.marks(label, threat)
                out.append(f"| **{group}** | {threat} | {gradients} | {self._fmt(self.cell(label, CLEAN, threat), 'mean')} "
                           f"| {self._fmt(robust, 'mean')} | **{self._fmt(robust, 'worst')}** | "
                           f"{'⚠ ' + marks if marks else ''} |")
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

    def to_markdown(self) -> str:
        runs = self.meta.get("n_eval", "R")
        out = [self.headline(), ""]
        for threat in self.threats:
            out.append(f"**{threat}, eps = {self.eps[threat]:.4g}**  (n = {self.meta.get('n', '?')}, R = {runs})\n")
            out.append("Worst-of-R (%): an image counts if all R purifications of its worst candidate are correct "
                       "[95 % Wilson interval]")
            out.append("")
            out += self._grid(threat, "worst")
            out += ["", "Avg (%): the fraction of those R purifications that are correct, averaged over images "
                        "[95 % Korn-Graubard interval]", ""]
            out += self._grid(threat, "mean")
            out.append("")
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


# ----------------------------------------------------------------------------------------- diagnostics
def _surrogates(table: Table, group: str, threat: str) -> list:
    """Each non-exact gradient of the group against the exact row: per image the worst Avg over the attacks that
    follow that gradient (bpda-eot counts for 'bpda'), compared with a one-sided sign test.  Nothing for a defense
    with one gradient only (a bare classifier: its bpda-eot is plain PGD)."""
    if group in table.meta.get("one_gradient", ()):
        return []
    members = table.members(group)
    exact = next((d for d in members if (d.partition("@")[2] or "exact") == "exact"), None)
    following = [a for a in table.attacks if a not in OWN_GRADIENT]

    def worst(rows_attacks):
        accs = [table.samples[(r, a, threat)].acc for r, a in rows_attacks if (r, a, threat) in table.samples]
        return torch.stack(accs).min(0).values if accs else None

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
                    "exact_avg": 100 * float(base.mean()), "surrogate_avg": 100 * float(acc.mean()),
                    "wins": wins, "losses": losses, "p": p, "fired": bool(wins > losses and p < SIGN_P)})
    return out


def _diagnose(table: Table, records: dict, threat: str) -> None:
    for group in table.group_names():
        members = table.members(group)
        d = {"consistency": None, "surrogates": _surrogates(table, group, threat), "large_eps": None,
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
            accs = {m: _kept(r)[0].double().mean(0) for m, r in big}
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


def _kept(record: dict):
    """(runs, width) verdicts of the candidate kept per image in an attack or large-eps record, and (width,)
    the kept candidates' indices."""
    correct = torch.tensor(record["correct"], dtype=torch.bool)
    chosen = select_worst(correct, torch.tensor(record["loss"], dtype=torch.float64))
    return correct[chosen, :, torch.arange(correct.shape[2])].T, chosen


# --------------------------------------------------------------------------------------------- evaluate
def _model_for(models, label, threat):
    m = models[label]
    return m[threat] if isinstance(m, dict) else m


def evaluate(models, x, y, *, attacks=("apgd-ce",), threats=("Linf",), eps=None, settings=AttackSettings(),
             n_eval=4, batch_size=64, seed=0, out_dir=None, tag=None, specs=None, progress=True, groups=None,
             diagnostics=True, diag_images=8, diag_draws=8) -> Table:
    """Clean and robust accuracy of every model under every attack and threat, worst cases and masking checks.

    models: {label: model} or {label: {threat: model}} (e.g. t* per threat); a model maps
    [0, 1] images (B, C, H, W) to logits.  x: (N, C, H, W) in [0, 1], y: (N,) int64.
    attacks: names from attacks.ATTACKS; threats: 'Linf' / 'L2'; eps: {threat: eps}
    (default: 8/255, 0.5).  n_eval: R, purifications of each candidate.  groups: {label: defense}
    (default: the label before '@'), the rows whose worst case is taken together (the same defense
    attacked with different gradients; a group's first row runs its clean and bpda-eot cells).
    diagnostics: run the masking checks on the first `diag_images` images (`diag_draws` draws for the
    gradient consistency).  out_dir: where per-task records go (resume + distributed merge); tag:
    anything else all results depend on (e.g. the data set), folded into the settings hash; specs:
    {label: what that model is}, hashed into its own cells' paths with a digest of the model's weights
    (nn.Modules), so adding a defense later reuses the others' batches and changed weights are never
    resumed.  Returns a Table (also saved to out_dir as results.json/.md/.csv and samples.csv by rank 0).
    """
    eps = {t: (eps or {}).get(t, DEFAULT_EPS[t]) for t in threats}
    for t in threats:
        if t not in NORMS:
            raise ValueError(f"threats: expected one of {NORMS}, got {t!r}")
    labels, attacks, threats = list(models), list(attacks), list(threats)
    groups = {d: (groups or {}).get(d, d.partition("@")[0]) for d in labels}
    first = {}
    for d in labels:
        first.setdefault(groups[d], d)
    n_images = x.shape[0]
    n_batches = (n_images + batch_size - 1) // batch_size
    n_diag = min(diag_images, n_images)
    # eot_chunk only splits the same draws into calls (to round-off): not hashed, so lowering it keeps the records
    hashed_settings = {k: v for k, v in asdict(settings).items() if k != "eot_chunk"}
    settings_doc = {"eps": eps, "attack_settings": hashed_settings, "n_eval": n_eval, "batch_size": batch_size,
                    "seed": seed, "data": [_tensor_digest(x), _tensor_digest(y)], "tag": tag, "record": RECORD_VERSION}
    run_hash = hashlib.sha256(json.dumps(settings_doc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    rank, world = _dist()
    root = None if out_dir is None else os.path.join(out_dir, "batches", run_hash)
    if out_dir is not None and rank == 0:
        removed = _remove_leftover_tmp(out_dir)
        if removed:
            print(f"evaluate: removed {len(removed)} temporary file(s) an interrupted run left in {out_dir}",
                  file=sys.stderr)
        os.makedirs(root, exist_ok=True)
        atomic_write_text(os.path.join(root, "settings.json"), json.dumps(settings_doc))
    if world > 1:
        if root is None:
            raise ValueError("out_dir: a distributed evaluation needs an out_dir to merge batch results")
        torch.distributed.barrier()  # no rank writes before rank 0 has cleaned up

    memo = {}
    weights = {(d, t): _weights_digest(_model_for(models, d, t), memo) for d in labels for t in threats}

    def runs_of(label, threat):
        return n_eval if is_randomized(_model_for(models, label, threat)) else 1

    def path(task: Task):
        spec = json.dumps({"spec": (specs or {}).get(task.label), "weights": weights[(task.label, task.threat)]},
                          sort_keys=True, default=str)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
        folder = os.path.join(root, task.threat, f"{task.label.replace('/', '_')}-{digest}")
        if task.kind == "attack":
            return os.path.join(folder, task.what, f"batch{task.batch:05d}.json")
        return os.path.join(folder, "diagnostics", f"{task.kind}.json")

    def expect(task: Task) -> dict:
        if task.kind == "attack":
            lo, hi = task.batch * batch_size, min((task.batch + 1) * batch_size, n_images)
            cell, runs = [task.label, task.what, task.threat], runs_of(task.label, task.threat)
        else:
            lo, hi = 0, n_diag
            cell = [task.label, task.kind, task.threat]
            runs = diag_draws if task.kind == "consistency" else runs_of(task.label, task.threat)
        meta = {"kind": task.kind, "cell": cell, "batch": task.batch, "index": [lo, hi], "width": hi - lo,
                "n_eval": runs, "hash": run_hash}
        if task.kind == "large-eps":  # the diagnostics' own settings live in their records, not in the run's hash
            meta["iterations"] = DIAG_ITER
        return meta

    tasks = []
    for threat in threats:
        for d in labels:
            for attack in [CLEAN, *attacks]:
                if (attack == CLEAN or attack in OWN_GRADIENT) and first[groups[d]] != d:
                    continue  # does not depend on the row's gradient: the group's first row runs it
                tasks += [Task("attack", d, attack, threat, b) for b in range(n_batches)]
        if diagnostics:
            for group, d in first.items():
                if is_randomized(_model_for(models, d, threat)):
                    tasks.append(Task("consistency", d, "consistency", threat))
            tasks += [Task("large-eps", d, "large-eps", threat) for d in labels]
    mine = tasks[rank::world]
    records = {}
    for task in mine if root is not None else ():
        rec = read_record(path(task), expect(task))
        if rec is not None:
            records[task] = rec
    todo = [task for task in mine if task not in records]
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="task", dynamic_ncols=True,
                   desc=f"eval [{world} rank{'s' if world > 1 else ''}, n = {n_images}, R = {n_eval}]")
    for task in todo:
        model = _model_for(models, task.label, task.threat)
        if bar is not None:
            steps = solve_steps(model)
            bar.set_postfix_str(f"{task.label} | {task.what} | {task.threat} | batch {task.batch}"
                                + (f" | {steps}" if steps else ""))
        meta = expect(task)
        lo, hi = meta["index"]
        xb, yb = x[lo:hi], y[lo:hi]
        start = time.perf_counter()
        if task.kind == "consistency":
            torch.manual_seed(batch_seed(seed, (groups[task.label], "consistency", task.threat), 0))
            grads = per_draw_gradients(with_gradient(model, "exact"), xb, yb, diag_draws, settings.eot_chunk)
            data = gradient_consistency(grads)
        else:
            if task.kind == "attack":
                s = batch_seed(seed, (task.label, task.what, task.threat), task.batch)
                torch.manual_seed(s)
                candidates = {CLEAN: xb} if task.what == CLEAN else run_attack(
                    task.what, model, xb, yb, norm=task.threat, eps=eps[task.threat], seed=s % 2**31, settings=settings)
            else:  # the unbounded attack: the whole image box is in the ball
                torch.manual_seed(batch_seed(seed, (task.label, "large-eps", task.threat), 0))
                big = 1.0 if task.threat == "Linf" else math.sqrt(xb[0].numel())
                candidates = pgd_eot_candidates(model, xb, yb, norm=task.threat, eps=big, n_iter=DIAG_ITER,
                                                eot=settings.pgd_eot if is_randomized(model) else 1,
                                                random_start=False, chunk=settings.eot_chunk)
            names, correct, loss = reevaluate(model, candidates, yb, meta["n_eval"], settings.eot_chunk)
            data = {"candidates": names, "correct": correct.int().tolist(), "loss": loss.tolist()}
            if task.kind == "large-eps":
                data["eps"] = big
        record = {**meta, **data, "seconds": time.perf_counter() - start}
        records[task] = record
        if root is not None:
            os.makedirs(os.path.dirname(path(task)), exist_ok=True)
            atomic_write_text(path(task), json.dumps(record))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:
        torch.distributed.barrier()
        for task in tasks:
            if task not in records:
                rec = read_record(path(task), expect(task))
                if rec is None:
                    raise RuntimeError(f"{path(task)}: another rank's result record is missing or unreadable; rerun "
                                       "the same command to recompute it")
                records[task] = rec

    table = Table(labels, attacks, threats, eps, groups=groups, labels=y.tolist(),
                  meta={"n": int(n_images), "n_eval": n_eval, "batch_size": batch_size, "seed": seed,
                        "hash": run_hash, "world_size": world, "diag_images": n_diag, "diag_draws": diag_draws,
                        "one_gradient": [g for g, d in first.items() if all(
                            with_gradient(_model_for(models, d, t), "bpda") is _model_for(models, d, t)
                            for t in threats)]})
    for task in tasks:
        if task.kind != "attack" or task.batch:
            continue
        parts = [records[Task("attack", task.label, task.what, task.threat, b)] for b in range(n_batches)]
        correct, names = [], []
        for rec in parts:
            kept, chosen = _kept(rec)
            correct.append(kept)
            names += [rec["candidates"][i] for i in chosen.tolist()]
        verdicts = Verdicts(torch.cat(correct, 1), names)
        for d in labels:  # a group's first row ran the cells that do not depend on the gradient: share them
            if d == task.label or (groups[d] == groups[task.label] and first[groups[d]] == task.label
                                   and (task.what == CLEAN or task.what in OWN_GRADIENT)):
                table.samples[(d, task.what, task.threat)] = verdicts
    if diagnostics:
        keyed = {(t.kind, groups[t.label] if t.kind == "consistency" else t.label, t.threat): records[t]
                 for t in tasks if t.kind != "attack"}
        for threat in threats:
            _diagnose(table, keyed, threat)
    table.meta["compute_seconds"] = round(sum(r["seconds"] for r in records.values()), 1)
    if out_dir is not None and rank == 0:
        table.save(out_dir)
    return table

"""Robustness evaluation: defenses x attacks x threat models -> accuracy tables (paper Tables 1-3).

`evaluate(models, x, y, ...)` is the one call.  A model is any callable from [0, 1] images to
logits (AutoAttack / RobustBench); `build_defense` turns a `Defense` spec into one (a bare
classifier or a `PurifiedClassifier`).

**Randomness.**  A purified classifier draws fresh noise on every call.  Every attack returns
candidates (coup_fast.attacks: final and best iterates, each AutoAttack version's output); each
candidate is purified R = `n_eval` times, and per image the candidate whose R purifications are
classified correctly least often is kept (ties: the higher mean cross-entropy).  An image's
accuracy is then reported three ways (coup_fast.table): **Avg**, the fraction of its R purifications
classified correctly; **MV**, whether more than half are (majority vote); **Worst-of-R**, whether all
R are (DiffHammer's N-evaluation).  The selection uses the same R purifications it reports: an
attacker allowed to query the defense would choose so, and the bias this leaves is towards the
attacker (a conservative robustness number).  Each image draws its own randomness (purify's `rows`,
the attacks' `draws`): an image's numbers do not depend on which others share its batch.

**The worst case.**  The rows of one defense (its group: 'coup', 'coup@detached-guidance',
'coup@adjoint', 'coup@bpda') are the same purifier attacked with different gradients.  Its
"worst case" row counts an image robust only if it survives every attack x gradient that ran
(AutoAttack's worst-case principle extended over gradients): per image the minimum of the
accuracies.  The column "all attacks" of a row does the same over its own attacks and the clean
image (a point of the ball too, so robust accuracy <= clean accuracy per image).  Attacks that fix
their own gradient (bpda-eot) and the clean image do not depend on the row's gradient: they run once
per group, in its first row, and are shared by its other rows.

**Schedules** (coup_fast.schedule): 'cascade' (the default) runs each group's rows x attacks in a
declared order and attacks, at each stage, only the images still robust under Worst-of-R, which
keeps the worst case's Worst-of-R exact and makes its Avg and MV upper bounds; 'full' attacks every
image with everything (complete per-row tables).

**Confidence intervals** (95 %, over images; coup_fast.stats): Wilson for the Worst-of-R and MV
fractions, the Korn-Graubard effective-size Wilson interval for Avg means.

**Gradient-masking checks**: coup_fast.diagnostics.

**Files** (out_dir; coup_fast.records): every (stage, batch) result is its own JSON record, signed
and written atomically under a hash of the settings; finished records are checked against what
their path, their stage's images, R and run promise, and skipped on restart; a bad record is
reported, renamed *.unreadable (never deleted) and recomputed.  One run holds out_dir at a time.
Each batch is seeded from (seed, cell, batch index) alone, so results do not depend on what ran
before, on restarts, or on how batches are spread over ranks.  Under torch.distributed the chains
(one batch of one defense: its stages depend on each other) and checks are dealt round-robin to
the ranks; after a barrier every rank reads all records and rank 0 writes results.{json,md,csv}
and samples.csv.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import diagnostics as checks
from . import plan, records, schedule
from .attacks import (AttackSettings, DEFAULT_EPS, NORMS, OWN_GRADIENT, ImageDraws, evaluate_logits, gradient_consistency,
                      is_randomized, per_draw_gradients, pgd_eot_candidates, run_attack, with_gradient)
from .lm import LMConfig, index_eps_model
from .purify import GRADIENTS, PurifiedClassifier
from .schedule import Chain, Task
from .sde import ReverseGrid
from .solver import LM_MODE
from .table import ALL, CHECKS, CLEAN, OUTPUT_FILES, Table, Verdicts, kept_verdicts, select_worst, worst_label  # noqa: F401

DEFENSES = ("none", "diffpure", "reverse", "coup", "lm", "coup-lm")
SDE_DEFENSES = ("diffpure", "reverse", "coup")
LM_DEFENSES = ("lm", "coup-lm")  # Sec. 5.2.1: likelihood maximization (Chen et al. 2023) without / with guidance
# What the attacker may differentiate with (purify's `gradient`); 'adjoint' is the published attack; 'exact-bf16' the
# exact gradient with the networks under bf16 autocast (cheaper; its candidates are evaluated in full precision).
ATTACK_GRADIENTS = ("exact", "detached-guidance", "adjoint", "bpda", "exact-bf16")
MODE = {"diffpure": "diffpure", "reverse": "reverse", "coup": "coup", "lm": LM_MODE, "coup-lm": LM_MODE}
DIAG_ITER = checks.DIAG_ITER
RECORD_VERSION = 3    # the record layout (the stage's images, candidates, R x m verdicts, signature); in the hash
MAX_CANDIDATES = 64   # more candidate names than any attack returns: a record claiming more is not ours


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


def bind_images(model, ids: list, width: int, generator: torch.Generator):
    """The model for one stage of a batch: a PurifiedClassifier draws its seeds from `generator` and each image the
    noise of its own row `ids[i]` of the batch of `width` (purify's `rows`), so that an image's purifications are the
    same whichever images of the batch a stage attacks.  Other models are returned as they are."""
    if not isinstance(model, PurifiedClassifier):
        return model
    rows = (torch.tensor(ids, dtype=torch.int64), width)
    return PurifiedClassifier(model.score_model, model.classifier,
                              **{**model.purify_kwargs, "rows": rows, "generator": generator})


# ----------------------------------------------------------------------------------------------- records
def _as_tensor(value, shape: tuple, name: str, kind: str) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise records.RecordError(f"its {name} is not a numeric array ({str(e)[:80]})") from None
    if tuple(t.shape) != shape and not (t.numel() == 0 and math.prod(shape) == 0):
        raise records.RecordError(f"its {name} has shape {tuple(t.shape)}, expected {shape}")
    if kind == "binary" and not ((t == 0) | (t == 1)).all():
        raise records.RecordError(f"its {name} holds values other than 0 and 1")
    if kind == "number" and torch.isnan(t).any():
        raise records.RecordError(f"its {name} holds NaN")
    return t


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_record(record, expect: dict) -> None:
    """Raise RecordError saying how `record` disagrees with what its path and stage promise (`expect`) or with its
    own shape.  Every field that building the tables reads is checked here."""
    if not isinstance(record, dict):
        raise records.RecordError(f"not a JSON object but a {type(record).__name__}")
    for key, want in expect.items():
        if record.get(key) != want:
            raise records.RecordError(f"its {key} is {_short(record.get(key))}, expected {_short(want)}")
    seconds = record.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (math.isfinite(seconds) and seconds >= 0):
        raise records.RecordError(f"its seconds is {_short(seconds)}, expected a finite number >= 0")
    runs = expect["n_eval"]
    width = len(expect["images"]) if "images" in expect else expect["width"]
    if expect["kind"] == "consistency":
        for key in ("cosine", "ratio"):
            _as_tensor(record.get(key), (width,), key, "number")
        _as_tensor(record.get("zero"), (width,), "zero", "binary")
        return
    names = record.get("candidates")
    if not (isinstance(names, list) and 0 < len(names) <= MAX_CANDIDATES
            and all(isinstance(n, str) and 0 < len(n) <= 64 for n in names)):
        raise records.RecordError(f"its candidates are {_short(names)}, expected a list of names")
    _as_tensor(record.get("correct"), (len(names), runs, width), "correct", "binary")
    _as_tensor(record.get("loss"), (len(names), width), "loss", "number")
    if expect["kind"] == "large-eps":
        radius = record.get("eps")
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
            raise records.RecordError(f"its eps is {_short(radius)}, expected a radius > 0")


def record_bytes(width: int, runs: int) -> int:
    """The most bytes a record of `width` images and R = runs can take (what reading one may cost)."""
    return 2**20 + 32 * MAX_CANDIDATES * width * (runs + 1)


# ----------------------------------------------------------------------------------------------- the run
def _model_for(models, label, threat):
    m = models[label]
    return m[threat] if isinstance(m, dict) else m


@dataclass
class _Run:
    """What every task of one evaluate() call shares: data, models, settings, paths and the record store."""

    models: dict
    x: torch.Tensor
    y: torch.Tensor
    attacks: list
    eps: dict
    settings: AttackSettings
    n_eval: int
    batch_size: int
    seed: int
    groups: dict
    first: dict
    schedule: str
    n_diag: int
    diag_draws: int
    run_hash: str
    root: str | None
    specs: dict
    weights: dict
    store: records.RecordStore | None = None

    @property
    def n_images(self) -> int:
        return self.x.shape[0]

    def runs_of(self, label, threat) -> int:
        return self.n_eval if is_randomized(_model_for(self.models, label, threat)) else 1

    def path(self, task: Task):
        spec = json.dumps({"spec": (self.specs or {}).get(task.label), "weights": self.weights[(task.label, task.threat)]},
                          sort_keys=True, default=str)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
        folder = os.path.join(self.root, task.threat, f"{task.label.replace('/', '_')}-{digest}")
        if task.kind == "attack":
            return os.path.join(folder, task.what, f"batch{task.batch:05d}.json")
        return os.path.join(folder, "diagnostics", f"{task.kind}.json")

    def expect(self, task: Task, images=None) -> dict:
        """What the record of `task` must say; images: the batch-local images an attack stage attacks."""
        if task.kind == "attack":
            lo, hi = task.batch * self.batch_size, min((task.batch + 1) * self.batch_size, self.n_images)
            cell, runs = [task.label, task.what, task.threat], self.runs_of(task.label, task.threat)
        else:
            lo, hi = 0, self.n_diag
            cell = [task.label, task.kind, task.threat]
            runs = self.diag_draws if task.kind == "consistency" else self.runs_of(task.label, task.threat)
        meta = {"kind": task.kind, "cell": cell, "batch": task.batch, "index": [lo, hi], "width": hi - lo,
                "n_eval": runs, "hash": self.run_hash}
        if task.kind == "attack":
            meta["images"] = list(images)
        if task.kind == "large-eps":  # the diagnostics' own settings live in their records, not in the run's hash
            meta["iterations"] = DIAG_ITER
        return meta

    def read(self, task: Task, meta: dict):
        if self.store is None:
            return None
        width = len(meta.get("images", range(meta["width"])))
        return self.store.read(self.path(task), lambda rec: check_record(rec, meta), record_bytes(width, meta["n_eval"]))

    def write(self, task: Task, record: dict) -> dict:
        return record if self.store is None else self.store.write(self.path(task), record)

    # ------------------------------------------------------------------------------------------- compute
    def attack_stage(self, task: Task, meta: dict) -> dict:
        """Attack the stage's images of its batch, re-evaluate every candidate R times: the record's data."""
        model = _model_for(self.models, task.label, task.threat)
        lo, _ = meta["index"]
        images = meta["images"]
        if not images:  # a cascade left nothing standing here
            return {"candidates": ["none-standing"], "correct": [[[] for _ in range(meta["n_eval"])]], "loss": [[]],
                    "gradients": 0.0, "purifications": 0.0}
        index = torch.tensor(images, dtype=torch.int64, device=self.x.device) + lo
        xb, yb = self.x[index], self.y[index]
        s = batch_seed(self.seed, (task.label, task.what, task.threat), task.batch)
        generator = torch.Generator().manual_seed(s)
        model = bind_images(model, images, meta["width"], generator)
        torch.manual_seed(s)
        candidates = {CLEAN: xb} if task.what == CLEAN else run_attack(
            task.what, model, xb, yb, norm=task.threat, eps=self.eps[task.threat], seed=s % 2**31,
            settings=self.settings, draws=ImageDraws(s, images, meta["width"]))
        names, correct, loss = reevaluate(model, candidates, yb, meta["n_eval"], self.settings.eot_chunk)
        work = plan.attack_work(task.what, self.settings, meta["n_eval"], is_randomized(model), model)
        return {"candidates": names, "correct": correct.int().tolist(), "loss": loss.tolist(),
                "gradients": work.gradients * len(images), "purifications": work.purifications * len(images)}

    def check_task(self, task: Task, meta: dict) -> dict:
        """A gradient-masking check's data (coup_fast.diagnostics) on the first n_diag images."""
        model = _model_for(self.models, task.label, task.threat)
        xb, yb = self.x[:self.n_diag], self.y[:self.n_diag]
        if task.kind == "consistency":
            torch.manual_seed(batch_seed(self.seed, (self.groups[task.label], "consistency", task.threat), 0))
            grads = per_draw_gradients(with_gradient(model, "exact"), xb, yb, self.diag_draws, self.settings.eot_chunk)
            return gradient_consistency(grads)
        torch.manual_seed(batch_seed(self.seed, (task.label, "large-eps", task.threat), 0))
        big = 1.0 if task.threat == "Linf" else math.sqrt(xb[0].numel())  # the whole image box is in the ball
        candidates = pgd_eot_candidates(model, xb, yb, norm=task.threat, eps=big, n_iter=DIAG_ITER,
                                        eot=self.settings.pgd_eot if is_randomized(model) else 1,
                                        random_start=False, chunk=self.settings.eot_chunk)
        names, correct, loss = reevaluate(model, candidates, yb, meta["n_eval"], self.settings.eot_chunk)
        return {"candidates": names, "correct": correct.int().tolist(), "loss": loss.tolist(), "eps": big}

    def run(self, task: Task, meta: dict, compute: bool, done) -> dict:
        """The task's record: read back, or (compute=True) computed and written; done() after each computed one."""
        record = self.read(task, meta)
        if record is None:
            if not compute:
                raise RuntimeError(f"{self.path(task)}: another rank's result record is missing or unreadable; rerun "
                                   "the same command to recompute it")
            start = time.perf_counter()
            data = self.attack_stage(task, meta) if task.kind == "attack" else self.check_task(task, meta)
            record = self.write(task, {**meta, **data, "seconds": time.perf_counter() - start})
        done(task)
        return record

    def walk(self, chain: Chain, compute: bool, done) -> dict:
        """Run (or read) a chain's stages in order, each on the images the schedule leaves it: {task: record}."""
        lo = chain.batch * self.batch_size
        width = min(lo + self.batch_size, self.n_images) - lo
        standing = set(range(width))
        always = {i for i in range(width) if lo + i < self.n_diag}
        out = {}
        for task in chain.stages:
            images = schedule.stage_images(self.schedule, width, standing, always)
            out[task] = record = self.run(task, self.expect(task, images), compute, done)
            kept, _ = kept_verdicts(record)
            standing &= set(schedule.survivors(images, kept.all(0).tolist()))
        return out


def _stage_order(run: _Run, threats) -> dict:
    """{(group, threat): the (row, attack) stages of the group in the order they run} (coup_fast.schedule)."""
    order = {}
    for threat in threats:
        for group in dict.fromkeys(run.groups.values()):
            rows = [d for d in run.models if run.groups[d] == group]

            def cost(row, attack):
                model = _model_for(run.models, row, threat)
                kw = getattr(model, "purify_kwargs", None)
                gradient = OWN_GRADIENT.get(attack, "exact" if kw is None else kw.get("gradient", "exact"))
                steps = 1 if kw is None else plan.solver_steps(model)
                return schedule.stage_cost(attack, gradient, run.settings, run.n_eval, is_randomized(model), steps, model)

            order[(group, threat)] = schedule.stage_order(rows, run.attacks, cost)
    return order


def evaluate(models, x, y, *, attacks=("apgd-ce",), threats=("Linf",), eps=None, settings=AttackSettings(),
             n_eval=4, batch_size=64, seed=0, out_dir=None, tag=None, specs=None, progress=True, groups=None,
             diagnostics=True, diag_images=8, diag_draws=8, schedule_name="cascade", batches=None) -> Table:
    """Clean and robust accuracy of every model under every attack and threat, worst cases and masking checks.

    models: {label: model} or {label: {threat: model}} (e.g. t* per threat); a model maps
    [0, 1] images (B, C, H, W) to logits.  x: (N, C, H, W) in [0, 1], y: (N,) int64.
    attacks: names from attacks.ATTACKS; threats: 'Linf' / 'L2'; eps: {threat: eps}
    (default: 8/255, 0.5).  n_eval: R, purifications of each candidate.  groups: {label: defense}
    (default: the label before '@'), the rows whose worst case is taken together (the same defense
    attacked with different gradients; a group's first row runs its clean and bpda-eot cells).
    diagnostics: run the masking checks on the first `diag_images` images (`diag_draws` draws for the
    gradient consistency).  schedule_name: 'cascade' or 'full' (coup_fast.schedule).  batches: run only these
    batch indices (a pilot, coup_fast.plan.pilot; the table covers their images).  out_dir: where per-task
    records go (resume + distributed merge); tag: anything else all results depend on (e.g. the data set), folded
    into the settings hash; specs: {label: what that model is}, hashed into its own cells' paths with a digest of
    the model's weights (nn.Modules), so adding a defense later reuses the others' batches and changed weights are
    never resumed.  Returns a Table (also saved to out_dir as results.json/.md/.csv and samples.csv by rank 0).
    """
    eps = {t: (eps or {}).get(t, DEFAULT_EPS[t]) for t in threats}
    for t in threats:
        if t not in NORMS:
            raise ValueError(f"threats: expected one of {NORMS}, got {t!r}")
    if schedule_name not in schedule.SCHEDULES:
        raise ValueError(f"schedule: expected one of {schedule.SCHEDULES}, got {schedule_name!r}")
    labels, attacks, threats = list(models), list(attacks), list(threats)
    groups = {d: (groups or {}).get(d, d.partition("@")[0]) for d in labels}
    first = {}
    for d in labels:
        first.setdefault(groups[d], d)
    n_images = x.shape[0]
    n_batches = (n_images + batch_size - 1) // batch_size
    batches = list(range(n_batches)) if batches is None else sorted(set(batches))
    if any(not 0 <= b < n_batches for b in batches):
        raise ValueError(f"batches: expected indices in [0, {n_batches}), got {batches}")
    n_diag = min(diag_images, n_images)
    # eot_chunk only splits the same draws into calls (to round-off): not hashed, so lowering it keeps the records
    hashed_settings = {k: v for k, v in asdict(settings).items() if k != "eot_chunk"}
    settings_doc = {"eps": eps, "attack_settings": hashed_settings, "n_eval": n_eval, "batch_size": batch_size,
                    "seed": seed, "data": [_tensor_digest(x), _tensor_digest(y)], "tag": tag, "record": RECORD_VERSION,
                    "schedule": schedule_name, "diag_images": n_diag}
    run_hash = hashlib.sha256(json.dumps(settings_doc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    rank, world = _dist()
    if world > 1 and out_dir is None:
        raise ValueError("out_dir: a distributed evaluation needs an out_dir to merge batch results")
    memo = {}
    run = _Run(models, x, y, attacks, eps, settings, n_eval, batch_size, seed, groups, first, schedule_name, n_diag,
               diag_draws, run_hash, None if out_dir is None else os.path.join(out_dir, "batches", run_hash), specs,
               {(d, t): _weights_digest(_model_for(models, d, t), memo) for d in labels for t in threats})
    with contextlib.ExitStack() as held:
        if out_dir is not None and rank == 0:
            held.enter_context(records.RunLock(out_dir))
            removed = records.remove_leftover_tmp(out_dir, (*OUTPUT_FILES, "config.json"))
            if removed:
                print(f"evaluate: removed {len(removed)} temporary file(s) an interrupted run left in {out_dir}",
                      file=sys.stderr)
            os.makedirs(run.root, exist_ok=True)
            records.atomic_write_text(os.path.join(run.root, "settings.json"), json.dumps(settings_doc))
            run.store = records.RecordStore(run.root, repair=True)
        if world > 1:
            torch.distributed.barrier()  # no rank writes before rank 0 has cleaned up and made the run's key
            if rank != 0:
                run.store = records.RecordStore(run.root, repair=False)
        table = _evaluate(run, threats, batches, diagnostics, progress, rank, world)
        if out_dir is not None and rank == 0:
            table.save(out_dir)
    return table


def _evaluate(run: _Run, threats, batches, diagnostics, progress, rank, world) -> Table:
    order = _stage_order(run, threats)
    chains = [c for c in schedule.chains(run.groups, order, threats, max(batches) + 1) if c.batch in batches]
    check_tasks = []
    if diagnostics:
        for threat in threats:
            for group, d in run.first.items():
                if is_randomized(_model_for(run.models, d, threat)):
                    check_tasks.append(Task("consistency", d, "consistency", threat))
            check_tasks += [Task("large-eps", d, "large-eps", threat) for d in run.models]
    units = chains + check_tasks  # a chain's stages depend on each other: a rank runs a whole chain
    mine = units[rank::world]
    bar = None
    if progress and rank == 0:
        total = sum(len(u.stages) if isinstance(u, Chain) else 1 for u in mine)
        bar = tqdm(total=total, unit="task", dynamic_ncols=True,
                   desc=f"eval [{world} rank{'s' if world > 1 else ''}, n = {run.n_images}, R = {run.n_eval}, "
                        f"{run.schedule}]")

    def done(task):
        if bar is not None:
            bar.update(1)

    def step(task):
        if bar is not None:
            steps = solve_steps(_model_for(run.models, task.label, task.threat))
            bar.set_postfix_str(f"{task.label} | {task.what} | {task.threat} | batch {task.batch}"
                                + (f" | {steps}" if steps else ""))

    results = {}
    for unit in mine:
        if isinstance(unit, Chain):
            step(unit.stages[0])
            results.update(run.walk(unit, True, lambda task: (done(task), step(task))))
        else:
            step(unit)
            results[unit] = run.run(unit, run.expect(unit), True, done)
    if bar is not None:
        bar.close()
        bar = None
    if world > 1:
        torch.distributed.barrier()
        for unit in units:
            if isinstance(unit, Chain) and unit.stages[0] not in results:
                results.update(run.walk(unit, False, done))
            elif not isinstance(unit, Chain) and unit not in results:
                results[unit] = run.run(unit, run.expect(unit), False, done)
    return _table(run, threats, batches, order, results, diagnostics, world)


def _table(run: _Run, threats, batches, order, results, diagnostics, world) -> Table:
    lo = [b * run.batch_size for b in batches]
    hi = [min((b + 1) * run.batch_size, run.n_images) for b in batches]
    image_index = [i for a, b in zip(lo, hi) for i in range(a, b)]
    n = len(image_index)
    stage_records = [r for t, r in results.items() if t.kind == "attack"]
    table = Table(list(run.models), run.attacks, threats, run.eps, groups=run.groups,
                  labels=run.y[image_index].tolist(),
                  meta={"n": n, "n_eval": run.n_eval, "batch_size": run.batch_size, "seed": run.seed,
                        "hash": run.run_hash, "world_size": world, "diag_images": run.n_diag,
                        "diag_draws": run.diag_draws, "schedule": run.schedule,
                        "order": {f"{g} ({t})": [f"{row}:{attack}" for row, attack in stages]
                                  for (g, t), stages in order.items()},
                        "gradients": sum(r.get("gradients", 0.0) for r in stage_records),
                        "purifications": sum(r.get("purifications", 0.0) for r in stage_records),
                        "one_gradient": [g for g, d in run.first.items() if all(
                            with_gradient(_model_for(run.models, d, t), "bpda") is _model_for(run.models, d, t)
                            for t in threats)]})
    if len(batches) < -(-run.n_images // run.batch_size):
        table.meta["batches"] = list(batches)
    table.meta["stages"] = _stage_tallies(run, order, results, batches)
    table.meta["check_seconds"] = round(sum(r["seconds"] for t, r in results.items() if t.kind != "attack"), 3)
    cells = {}
    for task, record in results.items():
        if task.kind == "attack":
            cells.setdefault((task.label, task.what, task.threat), {})[task.batch] = record
    for (label, what, threat), by_batch in cells.items():
        correct, names, attacked = [], [], []
        for b in batches:
            rec = by_batch[b]
            kept, chosen = kept_verdicts(rec)
            full = torch.zeros(rec["n_eval"], rec["width"], dtype=torch.bool)
            mask = torch.zeros(rec["width"], dtype=torch.bool)
            name = [""] * rec["width"]
            for j, i in enumerate(rec["images"]):
                full[:, i], mask[i], name[i] = kept[:, j], True, rec["candidates"][int(chosen[j])]
            correct.append(full)
            attacked.append(mask)
            names += name
        verdicts = Verdicts(torch.cat(correct, 1), names, torch.cat(attacked))
        group = run.groups[label]
        for d in run.models:  # a group's first row ran the cells that do not depend on the gradient: share them
            if d == label or (run.groups[d] == group and run.first[group] == label
                              and (what == CLEAN or what in OWN_GRADIENT)):
                table.samples[(d, what, threat)] = verdicts
    if diagnostics:
        keyed = {(t.kind, run.groups[t.label] if t.kind == "consistency" else t.label, t.threat): r
                 for t, r in results.items() if t.kind != "attack"}
        for threat in threats:
            checks.diagnose(table, keyed, threat)
    table.meta["compute_seconds"] = round(sum(r["seconds"] for r in results.values()), 1)
    return table


def _stage_tallies(run: _Run, order: dict, results: dict, batches) -> dict:
    """Per group and threat ('GROUP @ THREAT'), per stage in its order: the images it met, the non-diagnostic ones
    still standing when it started, the non-diagnostic images of these batches, and its seconds (a pilot prices the
    full run from them, coup_fast.pricing)."""
    out = {}
    for (group, threat), stages in order.items():
        rows = []
        for row, attack in stages:
            tally = {"stage": f"{row}: {attack}", "met": 0, "standing": 0, "pool": 0, "seconds": 0.0}
            for b in batches:
                rec = results.get(Task("attack", row, attack, threat, b))
                if rec is None:
                    continue
                diag = {i for i in range(rec["width"]) if b * run.batch_size + i < run.n_diag}
                tally["met"] += len(rec["images"])
                tally["standing"] += len(set(rec["images"]) - diag)
                tally["pool"] += rec["width"] - len(diag)
                tally["seconds"] += rec["seconds"]
            rows.append(tally)
        out[f"{group} @ {threat}"] = rows
    return out

"""Robustness evaluation: defenses x attacks x threat models -> accuracy table (paper Tables 1-3).

`evaluate(models, x, y, ...)` is the one call.  A model is any callable from [0, 1] images to
logits (AutoAttack / RobustBench); `build_defense` turns a `Defense` spec into one
(a bare classifier or a `PurifiedClassifier`).

Randomness is real: a purified classifier draws fresh noise on every call.  So the accuracy of
each cell is measured by classifying the final adversarial batch R = `n_eval` times (R
independent purifications) and reported two ways: the mean over the R runs, and the worst case
(a sample counts as robust only if it is classified correctly in all R).

Resumable and distributed: with `out_dir`, every (defense, attack, threat, batch) result goes to
its own JSON file, written atomically (tmp file + os.replace) under a hash of the settings;
finished batches are skipped on restart.  Each batch is seeded from (seed, cell, batch index)
alone, so results do not depend on what ran before, on restarts, or on how batches are spread
over ranks.  Under torch.distributed the batches are dealt round-robin to the ranks; after a
barrier every rank reads all batch files and rank 0 writes the merged table.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ._files import atomic_write_text
from .attacks import AttackSettings, DEFAULT_EPS, NORMS, run_attack
from .purify import GRADIENTS, PurifiedClassifier

DEFENSES = ("none", "diffpure", "reverse", "coup")
# What the attacker may differentiate with (purify's `gradient`); 'adjoint' is the published attack.
ATTACK_GRADIENTS = ("exact", "adjoint", "detached-guidance")
CLEAN = "clean"  # the pseudo-attack of the clean-accuracy column
MODE = {"diffpure": "diffpure", "reverse": "reverse", "coup": "coup"}


@dataclass(frozen=True)
class Defense:
    """A defense and the gradient its attacker uses.  name: one of DEFENSES."""

    name: str
    t_star: float = 0.1
    lam: float = 1.0
    dt: float = 1e-3
    gradient: str = "exact"
    diffusion: str = "ddpm"  # DiffPure's forward marginal (purify's `diffusion`)

    @property
    def label(self) -> str:
        """Row label: the name, plus '@gradient' when the attacker does not use the exact one."""
        return self.name if self.gradient == "exact" or self.name == "none" else f"{self.name}@{self.gradient}"

    @staticmethod
    def parse(spec: str, **settings) -> "Defense":
        """'coup' or 'coup@detached-guidance' (name@attacker-gradient) -> Defense."""
        name, _, gradient = spec.partition("@")
        if name not in DEFENSES:
            raise ValueError(f"defenses: unknown defense {name!r}; expected one of {DEFENSES} (optionally @gradient)")
        gradient = gradient or settings.pop("gradient", "exact")
        settings.pop("gradient", None)
        if gradient not in ATTACK_GRADIENTS:
            raise ValueError(f"defenses: unknown gradient {gradient!r} in {spec!r}; expected one of {ATTACK_GRADIENTS}")
        return Defense(name, gradient=gradient, **settings)


def build_defense(defense: Defense, score_model, classifier, engine: str = "auto"):
    """The model a Defense stands for: the bare classifier, or classifier(purify(x)) on `engine`."""
    if defense.name == "none":
        return classifier
    assert defense.gradient in GRADIENTS
    return PurifiedClassifier(score_model, classifier, t_star=defense.t_star, lam=defense.lam, dt=defense.dt,
                              mode=MODE[defense.name], gradient=defense.gradient, engine=engine,
                              diffusion=defense.diffusion)


def is_randomized(model) -> bool:
    """Stochastic models are evaluated R times; a model may say so with a `randomized` attribute."""
    return bool(getattr(model, "randomized", isinstance(model, PurifiedClassifier)))


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


@torch.no_grad()
def correct_matrix(model, x_advs, y, n_eval: int) -> torch.Tensor:
    """(R, B) bool: sample i classified correctly on every version's adversarial batch in run r."""
    runs = n_eval if is_randomized(model) else 1
    out = torch.ones(runs, y.shape[0], dtype=torch.bool, device=y.device)
    for r in range(runs):
        for x_adv in x_advs:
            out[r] &= model(x_adv).argmax(1) == y
    return out


@dataclass
class Table:
    """Accuracies (%) per (defense, attack, threat): mean over R purifications and worst case."""

    defenses: list
    attacks: list
    threats: list
    eps: dict
    cells: dict = field(default_factory=dict)  # (defense, attack, threat) -> {n, mean, worst, runs}
    meta: dict = field(default_factory=dict)

    def rows(self):
        for threat in self.threats:
            for defense in self.defenses:
                for attack in [CLEAN, *self.attacks]:
                    c = self.cells.get((defense, attack, threat))
                    if c is not None:
                        yield {"threat": threat, "eps": self.eps[threat], "defense": defense, "attack": attack, **c}

    def to_dict(self) -> dict:
        return {"defenses": self.defenses, "attacks": self.attacks, "threats": self.threats, "eps": self.eps,
                "rows": list(self.rows()), "meta": self.meta}

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, ["threat", "eps", "defense", "attack", "n", "runs", "mean", "worst"],
                                lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: row[k] for k in writer.fieldnames})
        return buf.getvalue()

    def to_markdown(self) -> str:
        runs = self.meta.get("n_eval", "R")
        out = []
        for threat in self.threats:
            out.append(f"**{threat}, eps = {self.eps[threat]:.4g}**  (n = {self.meta.get('n', '?')})\n")
            head = ["Defense", "Clean", *self.attacks]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
            for defense in self.defenses:
                vals = []
                for attack in [CLEAN, *self.attacks]:
                    c = self.cells.get((defense, attack, threat))
                    if c is None:
                        vals.append("-")
                    elif c["runs"] == 1:
                        vals.append(f"{c['mean']:.1f}")
                    else:
                        vals.append(f"{c['mean']:.1f} ({c['worst']:.1f})")
                out.append("| " + " | ".join([defense, *vals]) + " |")
            out.append("")
        out.append(f"Accuracy in %: mean over R = {runs} purifications of the final adversarial batch "
                   f"(in parentheses: worst case, correct in all R). 'aa' = worse of AutoAttack standard "
                   f"and rand per sample; name@gradient = attacker differentiates with that gradient.")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_markdown()

    def save(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        for name, text in (("results.json", json.dumps(self.to_dict(), indent=1)),
                           ("results.md", self.to_markdown() + "\n"), ("results.csv", self.to_csv())):
            atomic_write_text(os.path.join(out_dir, name), text)


def _cells(labels, attacks, threats):
    return [(d, a, t) for t in threats for d in labels for a in [CLEAN, *attacks]]


def _model_for(models, label, threat):
    m = models[label]
    return m[threat] if isinstance(m, dict) else m


def evaluate(models, x, y, *, attacks=("apgd-ce",), threats=("Linf",), eps=None, settings=AttackSettings(),
             n_eval=4, batch_size=64, seed=0, out_dir=None, tag=None, specs=None, progress=True) -> Table:
    """Clean and robust accuracy of every model under every attack and threat model.

    models: {label: model} or {label: {threat: model}} (e.g. t* per threat); a model maps
    [0, 1] images (B, C, H, W) to logits.  x: (N, C, H, W) in [0, 1], y: (N,) int64.
    attacks: names from attacks.ATTACKS; threats: 'Linf' / 'L2'; eps: {threat: eps}
    (default: 8/255, 0.5).  n_eval: R, purifications of each final batch.  out_dir: where
    per-batch results go (resume + distributed merge); tag: anything else all results depend
    on (e.g. the data set), folded into the settings hash; specs: {label: what that model is},
    hashed into its own cells' paths with a digest of the model's weights (nn.Modules), so adding a
    defense later reuses the others' batches and changed weights are never resumed.  Returns a Table (also saved to out_dir
    as results.json/.md/.csv by rank 0).
    """
    eps = {t: (eps or {}).get(t, DEFAULT_EPS[t]) for t in threats}
    for t in threats:
        if t not in NORMS:
            raise ValueError(f"threats: expected one of {NORMS}, got {t!r}")
    labels = list(models)
    cells = _cells(labels, list(attacks), list(threats))
    n_batches = (x.shape[0] + batch_size - 1) // batch_size
    settings_doc = {"eps": eps, "attack_settings": asdict(settings), "n_eval": n_eval, "batch_size": batch_size,
                    "seed": seed, "data": [_tensor_digest(x), _tensor_digest(y)], "tag": tag}
    run_hash = hashlib.sha256(json.dumps(settings_doc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    rank, world = _dist()
    root = None if out_dir is None else os.path.join(out_dir, "batches", run_hash)
    if root is not None and rank == 0:
        os.makedirs(root, exist_ok=True)
        atomic_write_text(os.path.join(root, "settings.json"), json.dumps(settings_doc))

    memo = {}
    weights = {(d, t): _weights_digest(_model_for(models, d, t), memo) for d in labels for t in threats}

    def path(cell, b):
        d, a, t = cell
        spec = json.dumps({"spec": (specs or {}).get(d), "weights": weights[(d, t)]}, sort_keys=True, default=str)
        folder = f"{d.replace('/', '_')}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
        return os.path.join(root, t, folder, a, f"batch{b:05d}.json")

    tasks = [(cell, b) for cell in cells for b in range(n_batches)]
    mine = tasks[rank::world]
    results = {}
    todo = [task for task in mine if root is None or not os.path.exists(path(*task))]
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="batch", dynamic_ncols=True,
                   desc=f"eval [{world} rank{'s' if world > 1 else ''}]")
    for cell, b in todo:
        defense, attack, threat = cell
        if bar is not None:
            bar.set_postfix_str(f"{defense} | {attack} | {threat} | batch {b}")
        lo, hi = b * batch_size, min((b + 1) * batch_size, x.shape[0])
        xb, yb = x[lo:hi], y[lo:hi]
        model = _model_for(models, defense, threat)
        s = batch_seed(seed, cell, b)
        torch.manual_seed(s)
        start = time.perf_counter()
        x_advs = [xb] if attack == CLEAN else run_attack(attack, model, xb, yb, norm=threat, eps=eps[threat],
                                                         seed=s % 2**31, settings=settings)
        correct = correct_matrix(model, x_advs, yb, n_eval)
        record = {"cell": list(cell), "batch": b, "index": [lo, hi], "correct": correct.int().tolist(),
                  "seconds": time.perf_counter() - start, "hash": run_hash}
        results[(cell, b)] = record
        if root is not None:
            os.makedirs(os.path.dirname(path(cell, b)), exist_ok=True)
            atomic_write_text(path(cell, b), json.dumps(record))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:
        if root is None:
            raise ValueError("out_dir: a distributed evaluation needs an out_dir to merge batch results")
        torch.distributed.barrier()
    table = Table(labels, list(attacks), list(threats), eps,
                  meta={"n": int(x.shape[0]), "n_eval": n_eval, "batch_size": batch_size, "seed": seed,
                        "hash": run_hash, "world_size": world})
    seconds = 0.0
    for cell in cells:
        mats = []
        for b in range(n_batches):
            rec = results.get((cell, b))
            if rec is None:
                with open(path(cell, b)) as f:
                    rec = json.load(f)
            mats.append(torch.tensor(rec["correct"], dtype=torch.bool))
            seconds += rec["seconds"]
        mat = torch.cat(mats, 1)  # (R, N)
        table.cells[cell] = {"n": mat.shape[1], "runs": mat.shape[0], "mean": 100.0 * mat.float().mean().item(),
                             "worst": 100.0 * mat.all(0).float().mean().item()}
    table.meta["compute_seconds"] = round(seconds, 1)
    if out_dir is not None and rank == 0:
        table.save(out_dir)
    return table

"""Attacks on purified classifiers: AutoAttack (pyautoattack, unpatched), APGD-CE, PGD+EOT, BPDA+EOT.

A model is any callable from [0, 1] images (B, C, H, W) to logits (B, K) (AutoAttack /
RobustBench convention).  Randomness (random starts, purification noise) comes from torch's
global RNG, so `torch.manual_seed` before a call reproduces it.

**Candidates.**  An attack on a stochastic defense cannot know which of its iterates is the
strongest: its own "is it fooled yet" checks are single purifications.  So each attack returns
*candidates*, every one an adversarial batch inside the eps-ball, and the evaluation
(coup_fast.evaluate) re-purifies each candidate R times and keeps, per image, the worst:

    attack        candidates
    pgd-eot       'final' (the last iterate) and 'best' (per image, the iterate whose EOT draws were
    bpda-eot      classified correctly least often, ties: the higher mean cross-entropy)
    apgd-ce       'adv' (APGD's x_best_adv: the last iterate that fooled one purification, else its start)
                  and 'max-loss' (x_best, the iterate of highest loss); per restart.  APGD runs on every
                  image: pyautoattack's perturb() drops the images one purification misclassified and
                  returns the clean image for those no single purification was fooled by
    aa-standard   'standard', 'rand': each AutoAttack version's output, as pyautoattack returns it (the
    aa-rand, aa   clean image where its single-purification check found no adversarial example)

**Batched EOT.**  An EOT gradient averages the loss gradient over K purifications.  Here the K
draws are one batched call, `PurifiedClassifier.sample_logits(x, K)` (K B rows, exactly the draws
of K sequential calls with the same RNG), in chunks of `AttackSettings.eot_chunk` samples when
memory needs it (1 = the sequential calls).  pyautoattack's own EOT loop (APGD with eot_iter, the
AutoAttack 'rand' version) makes K calls one after the other; `BatchedEOT` serves them from one
batched purification (see there).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .purify import PurifiedClassifier

NORMS = ("Linf", "L2")
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}  # the paper's CIFAR-10 threat models (Tables 1-3)
# Attack names.  'aa' is the paper's protocol: a sample is robust only if it survives both
# AutoAttack versions, 'aa-standard' (APGD-CE, APGD-T, FAB-T, Square) and 'aa-rand'
# (APGD-CE, APGD-DLR with EOT).
ATTACKS = ("apgd-ce", "aa", "aa-standard", "aa-rand", "pgd-eot", "bpda-eot")
AA_VERSIONS = {"aa": ("standard", "rand"), "aa-standard": ("standard",), "aa-rand": ("rand",)}
# Attacks that fix the attacker's gradient themselves, whatever the defense row's gradient is.
OWN_GRADIENT = {"bpda-eot": "bpda"}
PAPER_BPDA_STEP = 0.007 / (8 / 255)  # the paper's PGD-20 step, 0.007 at L-inf 8/255 (Sec. 5.2.2), relative to eps


@dataclass(frozen=True)
class AttackSettings:
    """Iteration budgets; the defaults are the paper's / AutoAttack's."""

    n_iter: int = 100            # APGD iterations (apgd-ce and inside AutoAttack)
    eot: int = 20                # EOT samples of AutoAttack 'rand' (APGD-CE, APGD-DLR)
    apgd_eot: int = 1            # EOT samples per gradient of the apgd-ce attack (AutoAttack's APGD-CE: 1)
    n_restarts: int = 1          # APGD restarts
    fab_iter: int = 100          # FAB-T iterations (aa-standard)
    square_queries: int = 5000   # Square queries (aa-standard)
    n_target_classes: int = 9    # APGD-T / FAB-T target classes (aa-standard)
    pgd_iter: int = 20           # pgd-eot iterations
    pgd_step: float | None = None  # pgd-eot step; None: pgd_step_scale * eps, or 2.5 eps / pgd_iter (Madry et al.)
    pgd_step_scale: float | None = None  # pgd-eot step relative to eps (a protocol's step, scaled with eps)
    pgd_eot: int = 20            # pgd-eot EOT samples per gradient
    pgd_random_start: bool = True  # False: BIM (Kurakin et al. 2017), PGD from the clean image
    bpda_iter: int = 20          # bpda-eot: PGD-20 (paper, Table 3)
    bpda_step: float | None = None  # bpda-eot step; None: 0.007 eps / (8/255), the paper's 0.007 at 8/255
    bpda_eot: int = 20           # bpda-eot EOT samples per gradient
    eot_chunk: int | None = None  # samples per batched purify call in EOT and evaluation (None: all; 1: sequential)

    def pgd_step_for(self, eps: float) -> float | None:
        """pgd-eot's step at radius eps (None: pgd_eot's default, 2.5 eps / iterations)."""
        if self.pgd_step is not None:
            return self.pgd_step
        return None if self.pgd_step_scale is None else self.pgd_step_scale * eps


def is_randomized(model) -> bool:
    """Stochastic models are evaluated R times; a model may say so with a `randomized` attribute."""
    return bool(getattr(model, "randomized", isinstance(model, PurifiedClassifier)))


def with_gradient(model, gradient: str):
    """The same defense with the attacker's backward pass switched (purify's `gradient=`).

    A PurifiedClassifier is rebuilt with that gradient; another model may offer `with_gradient(gradient)`
    itself; a model with neither has one gradient only and comes back unchanged.
    """
    if isinstance(model, PurifiedClassifier):
        return PurifiedClassifier(model.score_model, model.classifier, **{**model.purify_kwargs, "gradient": gradient})
    if callable(getattr(model, "with_gradient", None)):
        return model.with_gradient(gradient)
    return model


def _chunks(samples: int, chunk: int | None):
    size = samples if chunk is None else max(1, min(chunk, samples))
    return [min(size, samples - start) for start in range(0, samples, size)]


def sample_logits(model, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Logits of `samples` independent calls of `model` on x: (samples * B, C), sample r in rows r B .. (r + 1) B - 1.

    A PurifiedClassifier purifies all samples in one batch (its draws are those of `samples` sequential
    calls); a deterministic model is called once (its samples are equal); another stochastic model is
    called `samples` times.
    """
    if hasattr(model, "sample_logits"):
        return model.sample_logits(x, samples)
    if not is_randomized(model):
        return model(x).repeat(samples, 1)
    return torch.cat([model(x) for _ in range(samples)])


def eot_loss_grad(model, x: torch.Tensor, y: torch.Tensor, eot: int, chunk: int | None = None):
    """Expectation over Transformation (Athalye et al. 2018): the input gradient of the summed cross-entropy,
    averaged over `eot` independent purifications, and those purifications' logits.

    The draws are batched, `chunk` samples per call (None: all in one; 1: the sequential calls); each
    chunk's backward runs before the next chunk's forward, so memory holds one chunk's graph.  The
    draws are the same in every chunking.  Returns (gradient of x's shape, logits (eot, B, C) detached).
    """
    grad, logits = torch.zeros_like(x), []
    for size in _chunks(eot, chunk):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = sample_logits(model, xr, size)
            loss = F.cross_entropy(out, y.repeat(size), reduction="sum")
            (g,) = torch.autograd.grad(loss, xr)
        grad += g
        logits.append(out.detach().view(size, *y.shape, -1))
    return grad / eot, torch.cat(logits)


def eot_grad(model, x: torch.Tensor, y: torch.Tensor, eot: int, chunk: int | None = None) -> torch.Tensor:
    """The EOT gradient alone (see eot_loss_grad): the cross-entropy input gradient averaged over `eot` draws."""
    return eot_loss_grad(model, x, y, eot, chunk)[0]


@torch.no_grad()
def evaluate_logits(model, x: torch.Tensor, runs: int, chunk: int | None = None) -> torch.Tensor:
    """(runs, B, C) logits of `runs` independent purifications of x, batched `chunk` samples per call."""
    return torch.cat([sample_logits(model, x, size).view(size, x.shape[0], -1) for size in _chunks(runs, chunk)])


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations (B, ...) onto the L-inf or L2 ball of radius eps."""
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / flat).clamp(max=1.0).view(-1, *[1] * (delta.ndim - 1))


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))


class ImageDraws:
    """An attack's random numbers drawn image by image: the B images are the rows `ids` of a batch of `width`, and
    each draw is the draw of the whole batch (a generator seeded from `seed` and the draw's count) at those rows, so
    an image's random start is the same whichever other images of its batch are attacked (coup_fast.schedule)."""

    def __init__(self, seed: int, ids, width: int):
        self.seed, self.ids, self.width, self.count = int(seed), torch.as_tensor(ids, dtype=torch.int64), int(width), 0

    def _full(self, like: torch.Tensor, draw) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed + 7919 * self.count) % 2**63)
        self.count += 1
        full = draw((self.width, *like.shape[1:]), generator=generator, dtype=like.dtype)
        return full.index_select(0, self.ids).to(like.device)

    def rand_like(self, like: torch.Tensor) -> torch.Tensor:
        return self._full(like, torch.rand)

    def randn_like(self, like: torch.Tensor) -> torch.Tensor:
        return self._full(like, torch.randn)


def _random_start(x: torch.Tensor, norm: str, eps: float, draws: ImageDraws | None = None) -> torch.Tensor:
    rand_like = torch.rand_like if draws is None else draws.rand_like
    if norm == "Linf":
        return (rand_like(x) * 2 - 1) * eps
    d = torch.randn_like(x) if draws is None else draws.randn_like(x)
    r = rand_like(x[:, :1].flatten(1)[:, :1]).view(-1, *[1] * (x.ndim - 1))
    return _ascent(d, "L2") * eps * r


def pgd_eot_candidates(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, random_start=True,
                       chunk=None, draws: ImageDraws | None = None) -> dict:
    """PGD (Madry et al. 2018) with EOT gradients (Athalye et al. 2018) under L-inf or L2.

    x: (B, C, H, W) in [0, 1], y: (B,) int64.  step None: 2.5 eps / n_iter; random_start False is BIM
    (Kurakin et al. 2017).  Returns {'final': the last iterate, 'best': per image the iterate whose `eot`
    draws were classified correctly least often (ties: higher mean cross-entropy)}, each x + delta with
    ||delta|| <= eps, clamped to [0, 1].  The draws that estimate 'best' are the gradient's own: no extra cost.
    draws: the random start's numbers image by image (ImageDraws; None: torch's global RNG).
    """
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    step = 2.5 * eps / n_iter if step is None else step
    x = x.detach()
    delta = _random_start(x, norm, eps, draws) if random_start else torch.zeros_like(x)
    delta = (x + project(delta, norm, eps)).clamp(0, 1) - x
    best = x + delta
    best_acc = torch.full(y.shape, float("inf"), device=x.device)
    best_loss = torch.full(y.shape, -float("inf"), device=x.device)
    for _ in range(n_iter):
        g, logits = eot_loss_grad(model, x + delta, y, eot, chunk)
        acc = (logits.argmax(-1) == y).float().mean(0)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none").view(-1, *y.shape).mean(0)
        better = (acc < best_acc) | ((acc == best_acc) & (loss > best_loss))
        best = torch.where(better.view(-1, *[1] * (x.ndim - 1)), x + delta, best)
        best_acc, best_loss = torch.where(better, acc, best_acc), torch.where(better, loss, best_loss)
        delta = project(delta + step * _ascent(g, norm), norm, eps)
        delta = (x + delta).clamp(0, 1) - x
    return {"final": (x + delta).detach(), "best": best.detach()}


def pgd_eot(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, random_start=True, chunk=None):
    """PGD+EOT's last iterate (pgd_eot_candidates' 'final'): (B, C, H, W) in [0, 1] inside the eps-ball."""
    return pgd_eot_candidates(model, x, y, norm=norm, eps=eps, step=step, n_iter=n_iter, eot=eot,
                              random_start=random_start, chunk=chunk)["final"]


def bpda_step(eps: float, step: float | None = None) -> float:
    """BPDA's step: the paper's 0.007 at eps = 8/255, scaled with eps (a fixed 0.007 could not reach the boundary
    of a larger ball, e.g. L2 eps 0.5, in 20 steps); or `step` when given."""
    return PAPER_BPDA_STEP * eps if step is None else step


def bpda_eot_candidates(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, chunk=None,
                        draws: ImageDraws | None = None) -> dict:
    """BPDA+EOT (Athalye et al. 2018; paper Table 3): PGD whose backward pass treats the purifier as the identity
    (purify's gradient='bpda'), gradients averaged over EOT draws; candidates as pgd_eot_candidates."""
    return pgd_eot_candidates(with_gradient(model, "bpda"), x, y, norm=norm, eps=eps, step=bpda_step(eps, step),
                              n_iter=n_iter, eot=eot, chunk=chunk, draws=draws)


def bpda_eot(model, x, y, *, norm="Linf", eps=8 / 255, step=None, n_iter=20, eot=20, chunk=None):
    """BPDA+EOT's last iterate (bpda_eot_candidates' 'final')."""
    return bpda_eot_candidates(model, x, y, norm=norm, eps=eps, step=step, n_iter=n_iter, eot=eot, chunk=chunk)["final"]


# --------------------------------------------------------------------------------- pyautoattack's EOT, batched
class _Chunk:
    """`size` samples of one EOT gradient, purified in one call; their backward passes wait for each other."""

    def __init__(self, model, x, size: int, first: int):
        self.input = x.detach().requires_grad_(True)
        with torch.enable_grad():
            self.logits = sample_logits(model, self.input, size)  # (size * B, C), the graph kept for one backward
        self.size, self.first, self.batch = size, first, x.shape[0]
        self.upstream = {}

    def slice(self, r: int) -> torch.Tensor:
        i = r - self.first
        return self.logits[i * self.batch:(i + 1) * self.batch].detach()

    def backward(self, r: int, grad: torch.Tensor) -> torch.Tensor:
        self.upstream[r] = grad
        if len(self.upstream) < self.size:
            return torch.zeros_like(self.input)  # the sum comes with the chunk's last backward
        upstream = torch.cat([self.upstream[self.first + i] for i in range(self.size)])
        (g,) = torch.autograd.grad(self.logits, self.input, upstream)
        self.logits = None  # the graph is spent
        return g

    @property
    def unfinished(self) -> bool:
        """Some backward passes returned zeros but the chunk's sum was never delivered."""
        return 0 < len(self.upstream) < self.size


class _Slice(torch.autograd.Function):
    """Sample r's logits of a chunk, connected to x; the backward hands the upstream to the chunk."""

    @staticmethod
    def forward(ctx, x, chunk, r):
        ctx.chunk, ctx.r = chunk, r
        return chunk.slice(r).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return ctx.chunk.backward(ctx.r, grad), None, None


class BatchedEOT(nn.Module):
    """`model` for pyautoattack, serving its EOT loop's `eot` calls from batched purifications.

    APGD (autopgd_base.APGDAttack.attack_single_run) computes an EOT gradient as

        for _ in range(eot_iter):
            logits = model(x_adv); grad += autograd.grad(loss(logits), [x_adv])[0]

    on one tensor x_adv, and uses only the sum.  The first of those calls here purifies `chunk`
    samples (None: all `eot`) in one batch and each call returns the next sample's logits (the same
    draws as sequential calls: sample_logits).  The backward passes are deferred: each returns zeros
    and keeps its upstream gradient, and the one that completes a chunk runs one batched backward and
    returns the chunk's whole sum, so the total APGD accumulates is the sequential one (to round-off).
    This relies on the calling pattern above (consecutive calls on the same tensor, each followed by
    its backward, only their sum used), which pyautoattack 0.2's APGD-CE, APGD-DLR and AutoAttack's
    'rand' version follow.  A chunk left with some backward passes answered by zeros and its sum never
    delivered would make APGD's sum wrong: that is an error at the next call or at `check_finished()`,
    never silent.  Calls without gradient (no_grad, or x not requiring grad) go to the model unchanged.
    """

    def __init__(self, model, eot: int, chunk: int | None = None):
        super().__init__()
        self.model, self.eot, self.chunk_size = model, int(eot), chunk
        self.randomized = is_randomized(model)
        self._x = self._version = None
        self._calls, self._chunk = 0, None

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad) or self.eot == 1:
            return self.model(x)
        same = x is self._x and x._version == self._version and self._calls < self.eot
        if not same:
            self.check_finished()
            self._x, self._version, self._calls, self._chunk = x, x._version, 0, None
        r = self._calls
        if self._chunk is None or r >= self._chunk.first + self._chunk.size:
            if self._chunk is not None and self._chunk.unfinished:
                raise RuntimeError("BatchedEOT: a chunk's backward passes were not all run before the next chunk's "
                                   "calls; the caller does not follow the EOT pattern this wrapper serves")
            size = min(self.chunk_size or self.eot, self.eot - r)
            self._chunk = _Chunk(self.model, x, size, r)
        self._calls += 1
        return _Slice.apply(x, self._chunk, r)

    def check_finished(self) -> None:
        """Raise if deferred backward passes never received their sum (the EOT pattern was broken)."""
        if self._chunk is not None and self._chunk.unfinished:
            raise RuntimeError(f"BatchedEOT: only {len(self._chunk.upstream)} of a chunk's {self._chunk.size} backward "
                               "passes ran, so the EOT gradient pyautoattack summed is incomplete; the caller does not "
                               f"make {self.eot} consecutive calls, each with its backward")


def _eot_model(model, eot: int, chunk: int | None):
    return model if eot == 1 else BatchedEOT(model, eot, chunk)


# ------------------------------------------------------------------------------------------- pyautoattack
def _quiet_autoattack_logs():
    # pyautoattack warns on every randomized defense under 'standard' (expected: the paper runs
    # both versions on purpose) and logs per-attack progress; we report our own summary.
    logging.getLogger("auto-attack").setLevel(logging.ERROR)


def _set_apgd_iterations(apgd, n_iter: int):
    # APGD derives its step-size schedule (first checkpoint, minimum spacing, decrement) from
    # n_iter when it is built (Croce & Hein 2020: 22 %, 6 %, 3 % of the iterations); AutoAttack
    # builds it with n_iter = 100, so changing n_iter alone would keep the 100-iteration schedule.
    apgd.n_iter = n_iter
    apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def build_autoattack(model, *, version="rand", norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(),
                     device=None):
    """pyautoattack's AutoAttack (unpatched) for one version, budgets from settings; the 'rand' version's EOT
    calls are served batched (BatchedEOT)."""
    from pyautoattack import AutoAttack

    _quiet_autoattack_logs()
    if version == "rand":
        model = _eot_model(model, settings.eot, settings.eot_chunk)
    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)
    _set_apgd_iterations(adversary.apgd, settings.n_iter)
    adversary.apgd.n_restarts = settings.n_restarts
    if version == "rand":
        adversary.apgd.eot_iter = settings.eot
    else:
        _set_apgd_iterations(adversary.apgd_targeted, settings.n_iter)
        adversary.apgd_targeted.n_target_classes = settings.n_target_classes
        adversary.fab.n_iter = settings.fab_iter
        adversary.fab.n_target_classes = settings.n_target_classes
        adversary.square.n_queries = settings.square_queries
    return adversary


def autoattack(model, x, y, *, version="rand", norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings()):
    """One AutoAttack version through the unpatched pyautoattack package, budgets from settings."""
    adversary = build_autoattack(model, version=version, norm=norm, eps=eps, seed=seed, settings=settings,
                                 device=x.device)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    if isinstance(adversary.model, BatchedEOT):
        adversary.model.check_finished()
    return x_adv


def _apgd(model, x, *, norm, eps, seed, settings, eot, loss="ce"):
    from pyautoattack.autopgd_base import APGDAttack

    _quiet_autoattack_logs()
    return APGDAttack(_eot_model(model, eot, settings.eot_chunk), n_restarts=settings.n_restarts,
                      n_iter=settings.n_iter, eps=eps, norm=norm, loss=loss, eot_iter=eot, rho=0.75, seed=seed,
                      device=x.device)


def apgd_ce(model, x, y, *, norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(), eot=1):
    """APGD on the cross-entropy loss (Croce & Hein 2020), pyautoattack's APGDAttack.perturb; `eot` draws per
    gradient (1: none), served batched (BatchedEOT)."""
    attack = _apgd(model, x, norm=norm, eps=eps, seed=seed, settings=settings, eot=eot)
    adv = attack.perturb(x, y)
    if isinstance(attack.model, BatchedEOT):
        attack.model.check_finished()
    return adv


def apgd_ce_candidates(model, x, y, *, norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(), eot=1,
                       draws: ImageDraws | None = None) -> dict:
    """APGD-CE (pyautoattack's APGD iterations, attack_single_run) on every image, each restart's x_best_adv
    ('adv') and x_best ('max-loss') as candidates (module docstring); seeded as APGDAttack.perturb seeds.  draws:
    each restart's random start image by image (ImageDraws), made by APGD's own formula x + eps normalize(t), t
    uniform in [-1, 1] (L-inf) or normal (L2), and handed to attack_single_run as its x_init."""
    attack = _apgd(model, x, norm=norm, eps=eps, seed=seed, settings=settings, eot=eot)
    x, y = x.detach().clone().float(), y.detach().clone().long()
    attack.init_hyperparam(x)
    torch.random.manual_seed(attack.seed)
    if x.is_cuda:
        torch.cuda.random.manual_seed(attack.seed)
    out = {}
    for restart in range(settings.n_restarts):
        x_init = None
        if draws is not None:
            t = draws.rand_like(x) * 2 - 1 if norm == "Linf" else draws.randn_like(x)
            x_init = x + eps * attack.normalize(t)
        x_best, _, _, x_best_adv = attack.attack_single_run(x, y, x_init=x_init)
        tag = "" if settings.n_restarts == 1 else f"-{restart}"
        out[f"adv{tag}"], out[f"max-loss{tag}"] = x_best_adv.detach(), x_best.detach()
    if isinstance(attack.model, BatchedEOT):
        attack.model.check_finished()
    return out


def run_attack(name, model, x, y, *, norm="Linf", eps=None, seed=0, settings=AttackSettings(),
               draws: ImageDraws | None = None) -> dict:
    """Run attack `name` (one of ATTACKS): {candidate name: adversarial batch} (module docstring).

    The evaluation keeps, per image, the candidate whose re-evaluation is worst: for 'aa' that is the
    worse of AutoAttack standard and rand (the paper counts a sample robust only if it survives both).
    draws: the attack's random starts image by image (ImageDraws); AutoAttack draws its own.
    """
    if name not in ATTACKS:
        raise ValueError(f"attack: expected one of {ATTACKS}, got {name!r}")
    if norm not in NORMS:
        raise ValueError(f"threat: expected one of {NORMS}, got {norm!r}")
    eps = DEFAULT_EPS[norm] if eps is None else eps
    s = settings
    if name in AA_VERSIONS:
        return {v: autoattack(model, x, y, version=v, norm=norm, eps=eps, seed=seed, settings=s)
                for v in AA_VERSIONS[name]}
    if name == "apgd-ce":
        return apgd_ce_candidates(model, x, y, norm=norm, eps=eps, seed=seed, settings=s, eot=s.apgd_eot, draws=draws)
    if name == "pgd-eot":
        return pgd_eot_candidates(model, x, y, norm=norm, eps=eps, step=s.pgd_step_for(eps), n_iter=s.pgd_iter,
                                  eot=s.pgd_eot, random_start=s.pgd_random_start, chunk=s.eot_chunk, draws=draws)
    return bpda_eot_candidates(model, x, y, norm=norm, eps=eps, step=s.bpda_step, n_iter=s.bpda_iter, eot=s.bpda_eot,
                               chunk=s.eot_chunk, draws=draws)


def candidate_count(name: str, settings: AttackSettings = AttackSettings()) -> int:
    """How many candidates `run_attack(name)` returns (the evaluation re-purifies each R times)."""
    if name in AA_VERSIONS:
        return len(AA_VERSIONS[name])
    return 2 * settings.n_restarts if name == "apgd-ce" else 2


# ------------------------------------------------------------------------------------- masking diagnostics
def per_draw_gradients(model, x: torch.Tensor, y: torch.Tensor, draws: int, chunk: int | None = None) -> torch.Tensor:
    """(draws, B, ...) cross-entropy input gradients of `draws` independent purifications of x, each its own.

    The images are repeated `draws` times and purified as one batch: every row draws its own noise (the
    counter-based stream is indexed by the row), so the rows are independent purifications."""
    out = []
    for size in _chunks(draws, chunk):
        xr = x.detach().repeat(size, *[1] * (x.ndim - 1)).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xr), y.repeat(size), reduction="sum")
            (g,) = torch.autograd.grad(loss, xr)
        out.append(g.view(size, *x.shape))
    return torch.cat(out)


def gradient_consistency(grads: torch.Tensor) -> dict:
    """Per image, how much K draws' gradients (K, B, ...) agree: 'cosine', the mean pairwise cosine (1: all alike,
    ~0: as random directions), 'ratio', ||mean_k g_k|| / mean_k ||g_k|| (1: alike, 1/sqrt(K) for orthogonal draws of
    equal norm), and 'zero', whether every draw's gradient is exactly 0 (a gradient that cannot be followed).
    Lists of B floats / bools."""
    k = grads.shape[0]
    flat = grads.flatten(2).double()  # (K, B, d)
    norms = flat.norm(dim=-1)  # (K, B)
    unit = flat / norms.clamp_min(1e-300).unsqueeze(-1)
    gram = torch.einsum("kbd,jbd->bkj", unit, unit)  # (B, K, K)
    pairs = k * (k - 1)
    cosine = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / pairs if k > 1 else torch.ones(flat.shape[1])
    ratio = flat.mean(0).norm(dim=-1) / norms.mean(0).clamp_min(1e-300)
    zero = (norms == 0).all(0)
    return {"cosine": cosine.tolist(), "ratio": ratio.tolist(), "zero": zero.tolist()}

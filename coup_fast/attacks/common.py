"""What the attacks share: settings, EOT batching, losses, projections, candidate tracking, APGD's steps.

A model is any callable from [0, 1] images (B, C, H, W) to logits (B, K) (AutoAttack / RobustBench
convention).  Randomness (random starts, purification noise) comes from torch's global RNG, so
`torch.manual_seed` before a call reproduces it.

**Batched EOT.**  An EOT gradient averages the loss gradient over K purifications.  Here the K
draws are one batched call, `sample_logits(model, x, K)` (K B rows, exactly the draws of K
sequential calls with the same RNG), in chunks of `AttackSettings.eot_chunk` samples when memory
needs it (1 = the sequential calls).  pyautoattack's own EOT loop (APGD with eot_iter, the
AutoAttack 'rand' version) makes K calls one after the other; `BatchedEOT` serves them from one
batched purification (see there).

**Subgradients.**  Where autograd differentiates a clamp, a projection, a max or a sort here, the
subgradient is chosen explicitly (torch.where / a detached index), never left to torch's defaults,
which changed at the bounds in torch 2.14: a point exactly on a bound counts as inside (gradient 1),
a tie between logits goes to the first class in index order (docs/design.md, "Subgradients").
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..purify import PurifiedClassifier

NORMS = ("Linf", "L2")
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}  # the paper's CIFAR-10 threat models (Tables 1-3)
# Classification losses an attack can ascend (per image): cross-entropy; Carlini & Wagner's margin; Croce & Hein's DLR.
LOSSES = ("ce", "margin", "dlr")


@dataclass(frozen=True)
class AttackSettings:
    """Iteration budgets; the defaults are the literature's (coup_fast.attacks.registry names the sources)."""

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
    loss: str = "ce"             # the loss pgd-eot and bpda-eot ascend, one of LOSSES
    diffattack_iter: int = 100   # DiffAttack: APGD iterations per round (Kang et al. 2023, App. D.2: 100)
    diffattack_eot: int = 20     # DiffAttack: EOT draws per gradient (App. D.2: 20)
    diffattack_lambda: float = 1.0  # DiffAttack: weight of the deviated-reconstruction loss (App. D.2: 1.0)
    diffattack_steps: int | None = None  # DiffAttack: states carrying L_dev, evenly spaced (None: all N)
    diffhammer_iter: int = 50    # DiffHammer: APGD iterations per restart (Wang et al. 2024, App. C.1.2: 3 x 50)
    diffhammer_restarts: int = 3  # DiffHammer: restarts, their losses cycling margin, ce, dlr (the code's CW, CE, DLR)
    diffhammer_n: int = 10       # DiffHammer: N purification paths per iteration (Sec. 4.1 and 4.5: N = 10)
    diffhammer_alpha: float = 0.5  # DiffHammer: stepwise-EM exponent, g_t = t^-a g + (1 - t^-a) g_{t-1} (Sec. 4.5)
    diffhammer_em_lam: float = 5.0  # DiffHammer: sharpness of sigma(z) = sigmoid(lam z) in the E-step (code: EM_LAM)

    def __post_init__(self):
        """The new attacks' settings checked here (the CLI checks the others): ValueError naming the flag."""
        if self.loss not in LOSSES:
            raise ValueError(f"--loss: expected one of {LOSSES}, got {self.loss!r}")
        for name in ("diffattack_iter", "diffattack_eot", "diffhammer_iter", "diffhammer_restarts", "diffhammer_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
        steps = self.diffattack_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"--diffattack-steps: expected an integer >= 1 (or unset: every step), got {steps!r}")
        for name in ("diffattack_lambda", "diffhammer_alpha", "diffhammer_em_lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected a finite number >= 0, got {value!r}")

    def pgd_step_for(self, eps: float) -> float | None:
        """pgd-eot's step at radius eps (None: pgd_eot's default, 2.5 eps / iterations)."""
        if self.pgd_step is not None:
            return self.pgd_step
        return None if self.pgd_step_scale is None else self.pgd_step_scale * eps


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


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


# ------------------------------------------------------------------------------------------------- losses
def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini & Wagner's margin (2017, their f_6, untargeted, no confidence cap), to be maximised:
    max_{j != y} z_j - z_y per row, (B, C) -> (B,).  Its gradient is e_{j*} - e_y, j* the first maximal
    other class (ties: the lowest index)."""
    others = logits.detach().masked_fill(F.one_hot(y, logits.shape[-1]).bool(), -math.inf)
    j = others.argmax(-1, keepdim=True)  # torch.argmax returns the first maximal index
    return (logits.gather(-1, j) - logits.gather(-1, y.unsqueeze(-1))).squeeze(-1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference of logits ratio (ICML 2020, Eq. 6; AutoAttack's APGD-DLR), to be maximised:
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), pi the classes by decreasing logit, per row.
    The order is a stable descending sort of the detached logits (ties: the lower index first), so the
    gradient is the one of that fixed order.  Needs at least 3 classes."""
    if logits.shape[-1] < 3:
        raise ValueError(f"loss: 'dlr' divides by z_pi1 - z_pi3 and needs at least 3 classes, got {logits.shape[-1]}")
    order = logits.detach().argsort(dim=-1, descending=True, stable=True)
    top, third = logits.gather(-1, order[..., :1]), logits.gather(-1, order[..., 2:3])
    best_other = torch.where(order[..., :1] == y.unsqueeze(-1), order[..., 1:2], order[..., :1])
    z_y = logits.gather(-1, y.unsqueeze(-1))
    return (-(z_y - logits.gather(-1, best_other)) / (top - third + 1e-12)).squeeze(-1)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row loss `name` (one of LOSSES) of logits (B, C) for labels y (B,): (B,)."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "margin":
        return margin_loss(logits, y)
    if name == "dlr":
        return dlr_loss(logits, y)
    raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")


def mean_draw_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per image the mean loss over the draws of logits (draws, B, C): (B,)."""
    if loss == "ce":
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none").view(-1, *y.shape
                                                                                                        ).mean(0)
    return attack_loss(loss, logits.flatten(0, 1), y.repeat(logits.shape[0])).view(-1, *y.shape).mean(0)


# -------------------------------------------------------------------------------------------------- EOT
def eot_loss_grad(model, x: torch.Tensor, y: torch.Tensor, eot: int, chunk: int | None = None, loss: str = "ce"):
    """Expectation over Transformation (Athalye et al. 2018): the input gradient of the summed loss (`loss`, one of
    LOSSES; cross-entropy by default), averaged over `eot` independent purifications, and those purifications' logits.

    The draws are batched, `chunk` samples per call (None: all in one; 1: the sequential calls); each
    chunk's backward runs before the next chunk's forward, so memory holds one chunk's graph.  The
    draws are the same in every chunking.  Returns (gradient of x's shape, logits (eot, B, C) detached).
    """
    grad, logits = torch.zeros_like(x), []
    for size in _chunks(eot, chunk):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = sample_logits(model, xr, size)
            if loss == "ce":
                total = F.cross_entropy(out, y.repeat(size), reduction="sum")
            else:
                total = attack_loss(loss, out, y.repeat(size)).sum()
            (g,) = torch.autograd.grad(total, xr)
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


# ------------------------------------------------------------------------------------------ projections
def clip(v: torch.Tensor, lo, hi) -> torch.Tensor:
    """v clipped to [lo, hi] (numbers or tensors), as torch.clamp computes it, with the subgradient stated:
    1 inside and exactly on a bound (pass-through), 0 strictly outside."""
    return torch.where(v > hi, hi, torch.where(v < lo, lo, v))


def to_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The perturbation that keeps x + delta in the image box [0, 1] (clip's subgradient)."""
    return clip(x + delta, 0.0, 1.0) - x


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations (B, ...) onto the L-inf or L2 ball of radius eps.  A perturbation exactly on the
    sphere counts as inside: the Jacobian there is the identity (the clip's pass-through)."""
    if norm == "Linf":
        return clip(delta, -eps, eps)
    length = delta.flatten(1).norm(dim=1)
    outside = length > eps
    scale = eps / torch.where(outside, length, eps)  # 1 inside and on the sphere; no 0/0 in either branch
    return delta * scale.view(-1, *[1] * (delta.ndim - 1))


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))


class ImageDraws:
    """An attack's random numbers drawn image by image: the B images are the rows `ids` of a batch of `width`, and
    each draw is the draw of the whole batch (a generator seeded from `seed` and the draw's count) at those rows, so
    an image's random start is the same whichever other images of its batch are attacked (coup_fast.schedule;
    purify's `rows` does the same for the purification noise)."""

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


def rand_like(x: torch.Tensor, draws: ImageDraws | None) -> torch.Tensor:
    """Uniform [0, 1) numbers shaped like x: image by image from `draws`, else from torch's global RNG."""
    return torch.rand_like(x) if draws is None else draws.rand_like(x)


def randn_like(x: torch.Tensor, draws: ImageDraws | None) -> torch.Tensor:
    """Standard normals shaped like x: image by image from `draws`, else from torch's global RNG."""
    return torch.randn_like(x) if draws is None else draws.randn_like(x)


def _random_start(x: torch.Tensor, norm: str, eps: float, draws: ImageDraws | None = None) -> torch.Tensor:
    if norm == "Linf":
        return (rand_like(x, draws) * 2 - 1) * eps
    d = randn_like(x, draws)
    r = rand_like(x.new_empty(x.shape[0], 1), draws).view(-1, *[1] * (x.ndim - 1))
    return _ascent(d, "L2") * eps * r


# ------------------------------------------------------------------------------------------- candidates
class BestIterate:
    """Per image, the iterate whose draws were classified correctly least often, ties broken by the higher loss
    (PGD-EOT's 'best' candidate; the evaluation's own rule, coup_fast.evaluate.select_worst)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x
        self.acc = torch.full(y.shape, float("inf"), device=x.device)
        self.loss = torch.full(y.shape, -float("inf"), device=x.device)

    def update(self, x: torch.Tensor, acc: torch.Tensor, loss: torch.Tensor) -> None:
        """x: the iterate (B, ...); acc: (B,) fraction of its draws classified correctly; loss: (B,)."""
        better = (acc < self.acc) | ((acc == self.acc) & (loss > self.loss))
        self.x = torch.where(better.view(-1, *[1] * (x.ndim - 1)), x, self.x)
        self.acc, self.loss = torch.where(better, acc, self.acc), torch.where(better, loss, self.loss)


# ------------------------------------------------------------------------------------------ APGD's steps
def apgd_ascent(objective, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, n_iter: int, rho: float = 0.75,
                draws: ImageDraws | None = None):
    """AutoPGD (Croce & Hein, ICML 2020, Algorithm 1) on any objective, step for step as pyautoattack's
    APGDAttack.attack_single_run runs it under L-inf and L2: a random start on the ball's surface, step 2 eps,
    momentum 0.75, the step halved at the checkpoints (first at 22 % of the iterations, spacing shrinking by
    3 % to at least 6 %) where the loss rose in fewer than rho of the steps since the last one or the best
    loss did not move, each halving restarting from the best point (tests/test_attacks_common.py compares it with
    pyautoattack).

    objective(x_adv) -> (loss (B,), gradient of x's shape, acc (B,)[, rank (B,)]): per image the loss being
    maximised, the ascent direction (an EOT mean, a grafted gradient, ...), the fraction of its draws classified
    correctly, and optionally the loss that breaks ties between equally often correct iterates ('best'; default:
    loss).  It is called n_iter + 1 times (the start and every iterate).  Returns {'best': per image the
    iterate classified correctly least often (ties: higher loss), 'max-loss': APGD's x_best, the iterate of
    highest loss}, both inside the ball and [0, 1].  draws: the random start image by image (ImageDraws).
    """
    check_norm(norm)
    x = x.detach()
    batch_shape = [x.shape[0], *[1] * (x.ndim - 1)]
    t = 2 * rand_like(x, draws) - 1 if norm == "Linf" else randn_like(x, draws)
    x_adv = (x + eps * _normalize(t, norm)).clamp(0.0, 1.0)
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)

    loss, grad, acc, *rank = objective(x_adv)
    best = BestIterate(x_adv, y)
    best.update(x_adv, acc, rank[0] if rank else loss)
    x_best, loss_best, grad_best = x_adv.clone(), loss.detach().clone(), grad.clone()
    losses = torch.zeros(n_iter, x.shape[0], device=x.device)
    step = 2.0 * eps * torch.ones(batch_shape, device=x.device)
    x_old, counter, k = x_adv.clone(), 0, n_iter_2
    loss_last_check, reduced_last_check = loss_best.clone(), torch.ones_like(loss_best)
    for i in range(n_iter):
        with torch.no_grad():
            momentum, x_old = x_adv - x_old, x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            z = _apgd_project(x_adv + step * (grad.sign() if norm == "Linf" else _normalize(grad, norm)), x, norm, eps)
            x_adv = _apgd_project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, norm, eps)
        loss, grad, acc, *rank = objective(x_adv)
        best.update(x_adv, acc, rank[0] if rank else loss)
        with torch.no_grad():
            losses[i] = loss
            improved = loss > loss_best
            x_best = torch.where(improved.view(batch_shape), x_adv, x_best)
            grad_best = torch.where(improved.view(batch_shape), grad, grad_best)
            loss_best = torch.where(improved, loss, loss_best)
            counter += 1
            if counter == k:  # a checkpoint: halve where the ascent stalled, and go back to the best point there
                rises = sum((losses[i - j] > losses[i - j - 1]).float() for j in range(k))
                stalled = (rises <= k * rho) | ((1.0 - reduced_last_check) * (loss_last_check >= loss_best) > 0)
                reduced_last_check, loss_last_check = stalled.float(), loss_best.clone()
                halve = stalled.view(batch_shape)
                step = torch.where(halve, step / 2.0, step)
                x_adv, grad = torch.where(halve, x_best, x_adv), torch.where(halve, grad_best, grad)
                k, counter = max(k - size_decr, n_iter_min), 0
    return {"best": best.x.detach(), "max-loss": x_best.detach()}


def _normalize(v: torch.Tensor, norm: str) -> torch.Tensor:
    """v over its L-inf or L2 norm per image (+ 1e-12), as pyautoattack's APGD normalizes."""
    flat = v.flatten(1)
    size = flat.abs().max(1)[0] if norm == "Linf" else (flat ** 2).sum(-1).sqrt()
    return v / (size.view(-1, *[1] * (v.ndim - 1)) + 1e-12)


def _apgd_project(v: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """APGD's projection of a point onto the ball around x and the box (pyautoattack's operations and order;
    not differentiated)."""
    if norm == "Linf":
        return torch.clamp(torch.min(torch.max(v, x - eps), x + eps), 0.0, 1.0)
    length = ((v - x) ** 2).flatten(1).sum(-1).sqrt().view(-1, *[1] * (x.ndim - 1))
    return torch.clamp(x + _normalize(v - x, norm) * torch.min(eps * torch.ones_like(x), length), 0.0, 1.0)


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


def eot_model(model, eot: int, chunk: int | None):
    """`model` for pyautoattack's EOT loop of `eot` calls: itself for one draw, else BatchedEOT."""
    return model if eot == 1 else BatchedEOT(model, eot, chunk)


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

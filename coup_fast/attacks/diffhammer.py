"""DiffHammer (Wang, Fu, Han & Xiang, NeurIPS 2024): the selective attack on purification paths that share a
vulnerability, by expectation-maximisation, with gradient grafting (one backward pass through the purifier per
iteration).  The paper (Sec. 3, Algorithm 1, App. C.1) and its code (github.com/Ka1b0/DiffHammer, attacker.py,
config.py) define it; docs/design.md §10 gives the formulas and where the two differ.

Per iteration at the current point x (N purification paths phi_i, one batched purification):

    L_i, g_i        the loss of path i and its approximate gradient, the gradient w.r.t. the purified image
                    phi_i(x) (the classifier's backward only)
    choice          phi^ = argmax_j sum_i elu(L_i + eps u(g_j)^T g_i)         (Eq. 11; u = sign, or g/||g||_2)
    E-step          q_i  = sigmoid(lam (L_i + u(g_phi^)^T g_i))                (Eq. 9 with the code's Delta r and sigma)
    M-step          g~   = sum_i q_i g_i / sum_i q_i                          (Algorithm 1, line 11; the code's norm.)
    grafting        g    = (d phi^(x) / dx)^T g~                              (Eq. 10: one backward, through phi^ only)
    stepwise EM     g_t  = t^-alpha g + (1 - t^-alpha) g_{t-1}                (Algorithm 1, line 14)

and APGD (Croce & Hein 2020) steps on g_t.  Every quantity is per image, phi^ too.  Defaults: N = 10, alpha = 0.5,
lam = 5, three restarts of 50 iterations whose losses are the margin, cross-entropy and DLR (the code's CW, CE, DLR).

N-evaluation is the evaluation's (coup_fast.evaluate re-purifies each candidate R times, Avg and Worst-of-R); the
attack returns per restart 'best' (per image the iterate whose N paths were right least often, ties: higher mean
loss) and 'max-loss' (APGD's x_best).

The paths are one batched purification (purify's samples=N: the draws of N sequential calls).  Grafting replays the
chosen path of each image exactly: for the SDE purifiers with the Philox stream ('exact', 'detached-guidance',
'bpda') from each path's seed as explicit noise, one purification of the B images; for likelihood maximization and the
published adjoint (whose draws are not per row) one purification per distinct chosen path (at most N).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..noise import diffusion_counter, draw_seed, philox_normal
from ..purify import purify
from ..sde import ReverseGrid
from ..solver import LM_MODE
from .common import AttackSettings, _chunks, apgd_ascent, attack_loss, check_norm, is_randomized

LOSS_CYCLE = ("margin", "ce", "dlr")  # restart r ascends LOSS_CYCLE[r % 3] (the code's LOSS_NAMES: CW, CE, DLR)


def unit(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The code's unit step along flattened gradients (..., d): sign(g) under L-inf, g / ||g||_2 under L2."""
    if norm == "Linf":
        return g.sign()
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def choose_paths(losses: torch.Tensor, grads: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Eq. 11, per image: the path whose one-step attack eps u(g_j) raises the most paths' losses,
    argmax_j sum_i elu(L_i + eps u(g_j)^T g_i) (the code's seeds_select; ties: the first path).

    losses: (N, B); grads: (N, B, d) approximate gradients.  Returns (B,) path indices."""
    steps = eps * unit(grads, norm)  # (N_j, B, d)
    gains = torch.einsum("jbd,ibd->jib", steps, grads)  # (N_j, N_i, B): the linearised loss change of path i
    return F.elu(losses.unsqueeze(0) + gains).sum(1).argmax(0)


def em_weights(losses: torch.Tensor, grads: torch.Tensor, chosen: torch.Tensor, lam: float, norm: str) -> torch.Tensor:
    """The E-step, q_i = sigmoid(lam (L_i + u(g_phi^)^T g_i)), normalised over the N paths of each image (the
    M-step's weights): (N, B).  Computed as a softmax of log-sigmoids, so paths whose sigmoids underflow still
    get their share."""
    direction = unit(grads[chosen, torch.arange(grads.shape[1])], norm)  # (B, d): u(g_phi^) per image
    z = losses + torch.einsum("bd,ibd->ib", direction, grads)
    return torch.softmax(F.logsigmoid(lam * z), dim=0)


class Paths:
    """N purification paths of a model at x, and the replay of one of them per image with its gradient.

    model: a purified classifier (`purify(x, samples)`, `classifier`, `purify_kwargs`), or a deterministic
    classifier (its one path is the identity)."""

    def __init__(self, model):
        self.model = model
        kwargs = getattr(model, "purify_kwargs", None)
        if kwargs is None:
            if is_randomized(model):
                raise ValueError("model: DiffHammer needs the purified images of each path: a PurifiedClassifier "
                                 "(purify() and classifier) or a deterministic classifier")
            self.classifier, self.mode = model, None
            return
        self.classifier, self.kwargs = model.classifier, kwargs
        self.mode, self.gradient = kwargs.get("mode", "coup"), kwargs.get("gradient", "exact")
        self.generator = kwargs.get("generator")
        # the chosen path of each image replayed from its seed's draws, one purification of the B images
        self.by_row = self.mode != LM_MODE and self.gradient != "adjoint"

    def _rng_state(self):
        return torch.get_rng_state() if self.generator is None else self.generator.get_state()

    def _set_rng_state(self, state):
        if self.generator is None:
            torch.set_rng_state(state)
        else:
            self.generator.set_state(state)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int, chunk: int | None = None) -> torch.Tensor:
        """The N paths' purified images (N B, ...), path i in rows i B .. (i + 1) B - 1, purified `chunk` paths per
        call (None: all); remembers their seeds."""
        if self.mode is None:
            return x.repeat(n, *[1] * (x.ndim - 1))
        self.before = self._rng_state()
        images = torch.cat([self.model.purify(x, samples=size) for size in _chunks(n, chunk)])
        after = self._rng_state()
        self._set_rng_state(self.before)  # purify drew one seed per path, in order (purify's samples=)
        self.seeds = [draw_seed(self.generator) for _ in range(n)]
        if not torch.equal(self._rng_state(), after):
            raise RuntimeError("DiffHammer: the purifier's draws are not one seed per path; its paths cannot be "
                               "replayed")
        return images

    def graft(self, x: torch.Tensor, chosen: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
        """(d phi_chosen(x) / dx)^T upstream: image b's path chosen[b], replayed exactly (to round-off)."""
        if self.mode is None:
            return upstream
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.by_row:
                images = purify(xr, self.model.score_model, self.classifier,
                                **{**self.kwargs, "samples": 1, "generator": None, "rows": None,
                                   "noise": self._noise(x, chosen)})
                (grad,) = torch.autograd.grad(images, xr, upstream)
                return grad
            grad = torch.zeros_like(x)
            after = self._rng_state()
            for j in chosen.unique().tolist():  # one purification per distinct path, upstream on its rows only
                self._set_rng_state(self.before)
                for _ in range(j):
                    draw_seed(self.generator)
                images = self.model.purify(xr, samples=1)
                mine = (chosen == j).view(-1, *[1] * (x.ndim - 1))
                grad += torch.autograd.grad(images, xr, torch.where(mine, upstream, torch.zeros_like(upstream)))[0]
            self._set_rng_state(after)
            return grad

    def _noise(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """purify's explicit `noise` (n_draws, B, ...) whose row b is path chosen[b]'s draws: its seed's Philox stream
        at the counters a sample of B rows uses (docs/design.md §5)."""
        n_steps = ReverseGrid.from_dt(self.kwargs.get("t_star", 0.1), self.kwargs.get("dt", 1e-3)).n_steps
        counters = ([diffusion_counter(n_steps)] if self.mode == "diffpure" else []) + list(range(n_steps))
        noise = torch.empty(len(counters), *x.shape, dtype=x.dtype, device=x.device)
        ids, width = self.kwargs.get("rows") or (None, x.shape[0])  # purify's rows: these B of a virtual batch
        for j in chosen.unique().tolist():
            rows = chosen == j
            draws = torch.stack([philox_normal(self.seeds[j], k, (width, *x.shape[1:]), dtype=x.dtype, device=x.device)
                                 for k in counters])
            if ids is not None:
                draws = draws[:, torch.as_tensor(ids, device=x.device)]
            noise[:, rows] = draws[:, rows]
        return noise


def replays_per_iteration(model, n_paths: int) -> int:
    """Purifications with a gradient that grafting costs per iteration: 1 where the chosen paths are replayed row by
    row (the SDE purifiers' Philox stream), up to N where each distinct chosen path is replayed on its own
    (likelihood maximization, the published adjoint), 0 for a deterministic classifier (its path is the identity)."""
    if getattr(model, "purify_kwargs", None) is None:
        return 0
    return 1 if Paths(model).by_row else n_paths


def diffhammer_candidates(model, x, y, *, norm="Linf", eps=8 / 255, n_iter=50, restarts=3, n_paths=10, alpha=0.5,
                          em_lam=5.0, chunk=None, draws=None) -> dict:
    """DiffHammer (module docstring) under L-inf or L2: x (B, C, H, W) in [0, 1], y (B,).  Per restart r, APGD
    (common.apgd_ascent) on the grafted EM gradient of loss LOSS_CYCLE[r % 3], n_iter iterations, `n_paths` paths
    per iteration (purified `chunk` per call; None: all).  Returns {'<loss>-best', '<loss>-max-loss'} per restart
    (the restart index appended when a loss repeats), each inside the ball and [0, 1]."""
    check_norm(norm)
    paths = Paths(model)
    out = {}
    for restart in range(restarts):
        loss = LOSS_CYCLE[restart % len(LOSS_CYCLE)]
        found = apgd_ascent(_objective(paths, y, loss, eps, norm, n_paths, alpha, em_lam, chunk), x, y, norm=norm,
                            eps=eps, n_iter=n_iter, draws=draws)
        tag = loss if restarts <= len(LOSS_CYCLE) else f"{loss}-{restart}"
        out[f"{tag}-best"], out[f"{tag}-max-loss"] = found["best"], found["max-loss"]
    return out


def _objective(paths: Paths, y, loss: str, eps: float, norm: str, n_paths: int, alpha: float, em_lam: float,
               chunk: int | None = None):
    """APGD's objective at x: (the maximum loss over the N paths, the stepwise-EM grafted gradient, the fraction of
    the paths classified correctly, their mean loss), per image."""
    previous, calls = None, 0

    def objective(x):
        nonlocal previous, calls
        images = paths.sample(x, n_paths, chunk).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = paths.classifier(images)
            losses = attack_loss(loss, logits, y.repeat(n_paths))
            (grads,) = torch.autograd.grad(losses.sum(), images)
        losses, grads = losses.detach().view(n_paths, -1), grads.view(n_paths, x.shape[0], -1)
        chosen = choose_paths(losses, grads, eps, norm)
        weights = em_weights(losses, grads, chosen, em_lam, norm)
        upstream = (weights.unsqueeze(-1) * grads).sum(0).view_as(x)
        grad = paths.graft(x, chosen, upstream)
        calls += 1
        if previous is not None:
            v = calls ** -alpha
            grad = v * grad + (1 - v) * previous
        previous = grad
        correct = (logits.detach().argmax(-1) == y.repeat(n_paths)).view(n_paths, -1).float().mean(0)
        return losses.max(0).values, grad, correct, losses.mean(0)

    return objective


def run(model, x, y, *, norm, eps, seed, settings: AttackSettings, draws=None) -> dict:
    """The registry's entry: DiffHammer with settings' budget."""
    s = settings
    return diffhammer_candidates(model, x, y, norm=norm, eps=eps, n_iter=s.diffhammer_iter,
                                 restarts=s.diffhammer_restarts, n_paths=s.diffhammer_n, alpha=s.diffhammer_alpha,
                                 em_lam=s.diffhammer_em_lam, chunk=s.eot_chunk, draws=draws)

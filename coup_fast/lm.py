"""Likelihood-maximization (LM) purification with classifier-confidence guidance: the paper's DDPM variant
(arXiv 2408.05900, Sec. 5.2.1), the LM of Chen et al. 2023 (arXiv 2305.15241) with COUP's guidance added.

On states x in [-1, 1] (images u = (x + 1)/2 in [0, 1]), each image separately, with K fresh draws
(t_j, eps_j) per step, t_j an integer DDPM index:

    L(x)      = (1/K) sum_j w_{t_j} || eps_theta(sqrt(abar_{t_j}) x + sqrt(1 - abar_{t_j}) eps_j, t_j) - eps_j ||^2
                - lam log max_y p(y | (x + 1)/2)
    g_k       = grad_x L(x_k)                                   draws (t, eps) of step k
    x_{k+1}   = P(x_k - lr d_k),   k = 0 .. M-1                 d_k: the rule's step, P: the ball around x_0

Minimizing the denoising loss maximizes the ELBO of log p(x); COUP adds lam log max_y p(y|x) to what is
maximized (Sec. 5.2.1: "add classifier confidence guidance during likelihood maximization").  The
schedule is Ho et al.'s, betas = linspace(1e-4, 0.02, 1000), abar = cumprod(1 - betas) (sde.ddpm_alpha_bar).

Choices and their sources (every one is an `LMConfig` field with that default).  "T1" is Chen et al.'s
LM, `EDMEulerIntegralLM.likelihood_maximization_T1` in huanranchen/DiffusionClassifier,
defenses/PurificationDefenses/DiffPure/LikelihoodMaximization/EDMLM.py (an EDM model); "in_expectation"
is `likelihood_maximization_in_expectation` in the same file; "DiffHammer" is the public
re-implementation in the code of DiffHammer (Wang et al., NeurIPS 2024): the defense registered as
`llhd_maximize` (LikelihoodMaximizedClassifier) and its config.py (N_LM 5, EPS 100, T_MIN 0.4, T_MAX 0.6,
LR 0.1, BETA1 0.9, BETA2 0.999), also an EDM model.

    field      default          source
    n_steps    5                T1 iter_step=5; DiffHammer N_LM = 5
    rule       'adam'           T1: torch.optim.Adam on x, bias-corrected; DiffHammer: Adam with bias correction.
                                'sign' / 'normalized': in_expectation's L-inf / L2 branches: momentum accumulates
                                g / ||g||_1 (resp. ||g||_2) and x moves by lr sign(momentum) (resp. lr momentum)
    lr         0.1              T1 lr=0.1; DiffHammer LR 0.1; in_expectation step eps / iter_step = 0.5 / 5
    betas      (0.9, 0.999)     torch.optim.Adam's defaults (T1); DiffHammer BETA1, BETA2
    adam_eps   1e-8             torch.optim.Adam's default (T1); DiffHammer's 1e-8
    momentum   1.0              in_expectation: momentum = momentum - g / ||g|| (no decay)
    ball       'l2'             T1 and DiffHammer project every iterate, per image, onto an L2 ball around the input
    radius     200 (l2)         T1 l2_clamp(eps=2 * eps), eps=100; DiffHammer clamp(x, ori_x, eps * 2, p=2), EPS 100
               0.5 (linf)       in_expectation clamp(x, ori_x - eps, ori_x + eps), eps=0.5 on the state.
                                The factor 2 maps [0, 1] distances to the [-1, 1] state.  The L2 default never
                                binds: a CIFAR image's whole [-1, 1]^3072 cube has diameter 2 sqrt(3072) = 111
                                < 200 (and 5 bias-corrected Adam steps of lr 0.1 move a pixel by ~0.5 at most).
    t_range    (117, 170)       T1 and DiffHammer draw the EDM noise level sigma ~ U[0.4, 0.6] per image.  On the
                                DDPM schedule sigma = sqrt((1 - abar_t) / abar_t), and sigma in [0.4, 0.6] is the
                                indices 117 .. 170 exactly (sigma_117 = 0.4015, sigma_170 = 0.5994; DEFAULT_T_RANGE is
                                computed so).  We draw the index uniformly: sigma is linear in it there to 0.2 %.
    weighting  'x0'             T1's loss is mse(D(x + sigma eps, sigma), x) with the EDM denoiser D.  For an
                                eps-network, D(x + sigma eps) = x + sigma eps - sigma eps_theta, so
                                ||D - x||^2 = sigma^2 ||eps_theta - eps||^2: w_t = (1 - abar_t) / abar_t.
                                'simple': w_t = 1 (Ho et al.'s L_simple); 'elbo': w_t = beta_t / (2 alpha_t
                                (1 - abar_t)), the ELBO term L_{t-1} of Ho et al. Eq. 12 with sigma_t^2 = beta_t.
    reduction  'sum'            ||.||^2 over the pixels (per image): the ELBO's units, so lam weighs two log-densities.
                                'mean' is T1's F.mse_loss per image.  Adam does not see this scale; only the
                                guidance's relative weight does.  (T1's mse also averages over the batch: a factor
                                1/B that would tie lam to the batch size, so we keep images separate.)
    n_draws    1                T1 and DiffHammer: one (t, eps) per image per step
    clamp      False            T1 and DiffHammer clamp only the final image to [0, 1] (the pipeline does that);
                                clamp=True clamps every iterate to [-1, 1] (in_expectation clamps its iterates)
    lam        0.0              plain LM.  COUP-LM takes lam > 0; the paper gives no lam for this variant and its
                                official code does not contain it (COUP's SDE default is lam = 1).

DiffHammer's Adam keeps the bias-corrected moments as its state and detaches v; we follow torch.optim.Adam
(T1): the same first step, different later ones.

The t <-> index map (`index_to_time`).  Index j in 0..999 is DDPMUNet's convention: abar_j = prod_{l <= j}
(1 - beta_l), the marginal after j + 1 noising steps.  Song et al. (2021, App. B) take the VP SDE as the limit
of that chain with beta(t_i) = N beta_i at t_i = i / N for the 1-based step i = j + 1, so t_j = (j + 1) / 1000.
Then -log abar_j = sum_{l <= j} beta_l + O(sum beta^2) is the left Riemann sum of int_0^{t_j} beta(s) ds =
-2 log alpha(t_j): abar_j = alpha(t_j)^2 to first order in the step (at j = 0 they differ by 1e-5 = beta'/(2 N^2),
second order).  The map t = j / N leaves a whole step out (abar_j = alpha(j/N)^2 (1 - beta_j + ...)) and puts
index 0 at sigma = 0.  Over the default t range the two marginals' noise std differ by <= 0.29 % with
(j + 1) / N (0.48 % with j / N), their mean scale by <= 0.06 %.  DiffPure's forward diffusion
(sde.diffusion_marginal) uses the same map (index 1000 t* - 1).

The draws (`LMDraws`, `draw_counters`).  Step k's draw j uses the Philox counter c = k K + j: eps on the even
counter 2c (noise.philox_normal, offsets 2c numel + i), the index t on the odd counter 2c + 1 (the first
Philox word of offsets (2c + 1) numel + b, one per image b, mapped to the t range by multiply-shift).  Nothing
is stored; the backward pass regenerates them.  Explicit tensors can be given instead (tests).

The gradient with respect to the input x_0 (`lm_solve(gradient=...)`):
- 'exact': the adjoint of the M steps.  The step maps (x_k, m_k, v_k; x_0) -> (x_{k+1}, m_{k+1}, v_{k+1}),
  x_0 entering through the ball's centre.  The backward pass walks k = M-1 .. 0: it recomputes step k's graph
  from the saved x_k, m_k, v_k and the regenerated draws (g_k with create_graph, so the VJP holds the
  Hessian-vector products of the denoising loss and lam H of the guidance), takes its VJP with the adjoints
  (a_x, a_m, a_v), and adds the x_0 part to a separate accumulator; dL/dx_0 = a_x(0) + that sum.  Memory: the
  M saved states (3 tensors a step for Adam, 2 otherwise) plus one step's graph at a time.
- 'detached-guidance': the same adjoint with the guidance a constant (no lam H term), as for the SDE.
- 'bpda': straight-through (identity Jacobian).
  Kinks, where the derivative is chosen explicitly (coup_fast.kinks, docs/design.md §11), never left to the torch
  version: the projections use their inside branch on the boundary (L2: identity at ||x - x_0|| = r; L-inf and the
  [-1, 1] clamp: the inclusive pass-through, derivative 1 for an iterate exactly on a face, as torch <= 2.13's
  clamp gave it);
  sqrt(v_hat) has derivative 0 at v = 0 (only where every gradient so far was exactly 0; Adam's eps keeps the
  step finite); sign() has derivative 0 everywhere, so with rule='sign' the exact gradient has no network
  term at all: it is the product of the projections' Jacobians (the identity inside the ball); the guidance's
  argmax class y* is held fixed (guidance.py).  The norms of 'sign' / 'normalized' are floored at the dtype's
  smallest normal number (only an exactly zero gradient reaches it).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from . import kinks
from .guidance import classifier_logits, confidence_grad, log_max_softmax
from .noise import draw_seed, philox_4x32, philox_normal
from .score import EpsilonScore
from .sde import BETA_MAX, BETA_MIN, DDPM_STEPS, ddpm_alpha_bar, vp_sigma

RULES = ("adam", "sign", "normalized")
BALLS = ("l2", "linf")
WEIGHTINGS = ("x0", "simple", "elbo")
REDUCTIONS = ("sum", "mean")
GRADIENTS = ("exact", "detached-guidance", "bpda")
DEFAULT_RADIUS = {"l2": 200.0, "linf": 0.5}  # T1 / DiffHammer: 2 * 100; in_expectation: 0.5 (module docstring)
EDM_SIGMA_RANGE = (0.4, 0.6)  # T1's t_min, t_max: the EDM noise level sigma
SEED_LIMIT = 2**64  # Philox's key is 64 bits

BETAS = torch.linspace(BETA_MIN / DDPM_STEPS, BETA_MAX / DDPM_STEPS, DDPM_STEPS, dtype=torch.float64)
ALPHA_BAR = ddpm_alpha_bar()  # float64 (1000,), abar_j = prod_{l <= j} (1 - beta_l)


def sigma_index_range(sigma_min: float, sigma_max: float) -> tuple[int, int]:
    """The DDPM indices j whose EDM noise level sqrt((1 - abar_j) / abar_j) lies in [sigma_min, sigma_max]."""
    sigma = ((1.0 - ALPHA_BAR) / ALPHA_BAR).sqrt()
    inside = torch.nonzero((sigma >= sigma_min) & (sigma <= sigma_max)).flatten()
    return int(inside[0]), int(inside[-1])


DEFAULT_T_RANGE = sigma_index_range(*EDM_SIGMA_RANGE)  # (117, 170)


def index_to_time(index):
    """Continuous VP time t = (j + 1) / 1000 of DDPM index j (module docstring: abar_j = alpha(t)^2 to first order)."""
    return (index + 1) / DDPM_STEPS


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class LMConfig:
    """The LM solve's settings; the defaults are Chen et al.'s (sources in the module docstring).

    radius is in the [-1, 1] state space; None takes DEFAULT_RADIUS[ball].  t_range = (t_min, t_max), inclusive
    DDPM indices in 0..999.  lam = 0 is LM without guidance.
    """

    n_steps: int = 5
    lr: float = 0.1
    rule: str = "adam"
    ball: str = "l2"
    radius: float | None = None
    t_range: tuple = DEFAULT_T_RANGE
    weighting: str = "x0"
    reduction: str = "sum"
    lam: float = 0.0
    n_draws: int = 1
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 1.0
    clamp: bool = False

    def __post_init__(self):
        _require(_is_int(self.n_steps) and self.n_steps >= 1, "n_steps", "an integer >= 1", self.n_steps)
        _require(_is_real(self.lr) and self.lr > 0, "lr", "a finite number > 0", self.lr)
        _require(isinstance(self.rule, str) and self.rule in RULES, "rule", f"one of {RULES}", self.rule)
        _require(isinstance(self.ball, str) and self.ball in BALLS, "ball", f"one of {BALLS}", self.ball)
        if self.radius is None:
            object.__setattr__(self, "radius", DEFAULT_RADIUS[self.ball])
        _require(_is_real(self.radius) and self.radius > 0, "radius", "a finite number > 0 (state space)", self.radius)
        t_range = tuple(self.t_range) if isinstance(self.t_range, (tuple, list)) else self.t_range
        _require(isinstance(t_range, tuple) and len(t_range) == 2 and all(map(_is_int, t_range))
                 and 0 <= t_range[0] <= t_range[1] < DDPM_STEPS,
                 "t_range", f"(t_min, t_max), integers with 0 <= t_min <= t_max < {DDPM_STEPS}", self.t_range)
        object.__setattr__(self, "t_range", (int(t_range[0]), int(t_range[1])))
        _require(isinstance(self.weighting, str) and self.weighting in WEIGHTINGS, "weighting",
                 f"one of {WEIGHTINGS}", self.weighting)
        _require(isinstance(self.reduction, str) and self.reduction in REDUCTIONS, "reduction",
                 f"one of {REDUCTIONS}", self.reduction)
        _require(_is_real(self.lam) and self.lam >= 0, "lam", "a finite number >= 0", self.lam)
        _require(_is_int(self.n_draws) and self.n_draws >= 1, "n_draws", "an integer >= 1", self.n_draws)
        _require(isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                 and all(_is_real(b) and 0 <= b < 1 for b in self.betas),
                 "betas", "(beta1, beta2) in [0, 1)", self.betas)
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        _require(_is_real(self.adam_eps) and self.adam_eps > 0, "adam_eps", "a finite number > 0", self.adam_eps)
        _require(_is_real(self.momentum) and self.momentum >= 0, "momentum", "a finite number >= 0", self.momentum)
        _require(isinstance(self.clamp, bool), "clamp", "a bool", self.clamp)

    @property
    def n_state(self) -> int:
        """Optimizer tensors carried between steps: Adam's (m, v), or the momentum m."""
        return 2 if self.rule == "adam" else 1


# ---------------------------------------------------------------------------------------------- the eps-network
class IndexEpsModel(nn.Module):
    """eps_theta(x, j) on the DDPM index j in 0..999 from a continuous VP score model s(x, t), t in [0, 1].

    eps = -sigma(t_j) s(x, t_j) with t_j = (j + 1) / 1000 (`index_to_time`).  An EpsilonScore (such as the
    shipped digits model, label 999 t) is called through its eps-network directly, which is the same function
    without the sigma round trip.  x: (B, ...) states; j: (B,) integer tensor.  Returns eps of x's shape.
    """

    def __init__(self, score_model):
        super().__init__()
        self.score_model = score_model

    def forward(self, x, index):
        t = index_to_time(torch.as_tensor(index, device=x.device).to(x.dtype)).expand(x.shape[0])
        if isinstance(self.score_model, EpsilonScore):
            return self.score_model.eps_model(x, self.score_model.time_scale * t)
        return -vp_sigma(t).reshape(-1, *([1] * (x.ndim - 1))) * self.score_model(x, t)


def index_eps_model(score_model) -> IndexEpsModel:
    """A continuous VP score model (score(x, t), t in [0, 1]) as an eps-network on the DDPM index."""
    return IndexEpsModel(score_model)


# ------------------------------------------------------------------------------------------------- the draws
def draw_counters(k: int, j: int, n_draws: int) -> tuple[int, int]:
    """Philox counters (eps, t) of step k's draw j: 2c and 2c + 1 with c = k n_draws + j (the one place
    this is decided).  Counter c covers the offsets c numel .. c numel + numel - 1, so no two draws share words."""
    c = k * n_draws + j
    return 2 * c, 2 * c + 1


def philox_index(seed: int, counter: int, n: int, numel: int, t_range, device=None) -> torch.Tensor:
    """(n,) int64 uniform on t_range = (lo, hi) inclusive: the first Philox word w of offsets counter numel + b,
    mapped by lo + floor(w (hi - lo + 1) / 2^32) (bias <= 1000 / 2^32)."""
    lo, hi = t_range
    offset = torch.arange(n, dtype=torch.int64, device=device) + counter * numel
    word, _ = philox_4x32(int(seed), offset)
    return lo + ((word * (hi - lo + 1)) >> 32)


class LMDraws:
    """The (t, eps) draws of one LM solve: the Philox stream of a seed, or explicit tensors.

    like: the (B, ...) state.  draws: None, or (t, eps) with t (M, K, B) integer indices in 0..999 and eps
    (M, K, B, ...) standard normals (K = config.n_draws), used exactly.  Without draws the seed is `seed`,
    or drawn from `generator` (torch's global RNG if None).
    """

    def __init__(self, like: torch.Tensor, config: LMConfig, seed: int | None = None, draws=None, generator=None,
                 rows=None):
        self.config, self.shape, self.dtype, self.device = config, tuple(like.shape), like.dtype, like.device
        # rows = (ids, width): these B images are rows `ids` of a virtual batch of `width` and draw that batch's
        # draws at those rows (solver.NoiseStream): the same whichever subset of the batch is purified
        self.ids, width = (None, self.shape[0]) if rows is None else rows
        self.full_shape = (width, *self.shape[1:])
        if draws is not None:
            self.seed, self.t, self.eps = None, draws[0].to(like.device, torch.int64), draws[1].to(like)
        else:
            self.seed = draw_seed(generator) if seed is None else int(seed)
            self.t = self.eps = None

    def step(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step k's draws: t (K, B) int64 and eps (K, *shape)."""
        if self.t is not None:
            return self.t[k], self.eps[k]
        K, width, numel = self.config.n_draws, self.full_shape[0], math.prod(self.full_shape)
        ts, epss = [], []
        for j in range(K):
            c_eps, c_t = draw_counters(k, j, K)
            eps = philox_normal(self.seed, c_eps, self.full_shape, dtype=self.dtype, device=self.device)
            t = philox_index(self.seed, c_t, width, numel, self.config.t_range, self.device)
            if self.ids is not None:
                eps, t = eps.index_select(0, self.ids), t.index_select(0, self.ids)
            epss.append(eps)
            ts.append(t)
        return torch.stack(ts), torch.stack(epss)

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every draw, (M, K, B) and (M, K, *shape): the `draws=` that reproduces this stream."""
        steps = [self.step(k) for k in range(self.config.n_steps)]
        return torch.stack([s[0] for s in steps]), torch.stack([s[1] for s in steps])


# --------------------------------------------------------------------------------------------- the objective
def loss_weight(t: torch.Tensor, weighting: str, like: torch.Tensor) -> torch.Tensor:
    """w_t for integer indices t (module docstring): 'x0' (1 - abar)/abar, 'simple' 1,
    'elbo' beta/(2 alpha (1 - abar)); in like's dtype and device."""
    abar = ALPHA_BAR.to(like.device)[t]
    if weighting == "x0":
        w = (1.0 - abar) / abar
    elif weighting == "simple":
        w = torch.ones_like(abar)
    else:
        beta = BETAS.to(like.device)[t]
        w = beta / (2.0 * (1.0 - beta) * (1.0 - abar))
    return w.to(like.dtype)


def denoising_loss(x, t, eps, eps_model, config: LMConfig) -> torch.Tensor:
    """(1/K) sum_j w_{t_j} ||eps_theta(sqrt(abar) x + sqrt(1 - abar) eps_j, t_j) - eps_j||^2 per image: (B,).

    x: (B, ...) states in [-1, 1]; t: (K, B) indices; eps: (K, B, ...).  The K draws go through the network
    as one batch of K B.
    """
    K, B = t.shape
    abar = ALPHA_BAR.to(x.device)[t].to(x.dtype).reshape(K, B, *([1] * (x.ndim - 1)))
    x_t = abar.sqrt() * x + (1.0 - abar).sqrt() * eps
    pred = eps_model(x_t.flatten(0, 1), t.flatten())
    if not torch.is_tensor(pred) or pred.shape != x_t.flatten(0, 1).shape:
        got = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
        raise ValueError(f"eps_model: expected eps of shape {tuple(x_t.flatten(0, 1).shape)}, got {got}")
    err = (pred.reshape(eps.shape) - eps).square().flatten(2)
    err = err.sum(-1) if config.reduction == "sum" else err.mean(-1)
    return (loss_weight(t, config.weighting, x) * err).mean(0)


def objective(x, t, eps, eps_model, classifier, config: LMConfig, guidance: bool = True) -> torch.Tensor:
    """L(x) per image, (B,): the denoising loss minus lam log max_y p(y | (x + 1)/2) (guidance=False: without it)."""
    loss = denoising_loss(x, t, eps, eps_model, config)
    if guidance and config.lam > 0:
        loss = loss - config.lam * log_max_softmax(classifier_logits(classifier, x))
    return loss


def objective_grad(x, t, eps, eps_model, classifier, config: LMConfig, *, create_graph=False,
                   detach_guidance=False) -> torch.Tensor:
    """g = grad_x L(x), x's shape.  The images are independent, so this is the gradient of the sum over the batch.

    create_graph keeps g differentiable in x (the adjoint's Hessian-vector products; x must then be a leaf
    that requires grad).  detach_guidance adds the guidance gradient as a constant (no lam H term).
    """
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        total = objective(x, t, eps, eps_model, classifier, config, guidance=not detach_guidance).sum()
        (g,) = torch.autograd.grad(total, x, create_graph=create_graph)
    if detach_guidance and config.lam > 0:
        g = g - config.lam * confidence_grad(classifier, x.detach())
    return g


# -------------------------------------------------------------------------------------------------- the step
def _image_norm(x, p: int) -> torch.Tensor:
    """Per-image p-norm, shaped (B, 1, ...) to broadcast against x."""
    return torch.linalg.vector_norm(x.flatten(1), ord=p, dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def _sqrt0(v):
    """sqrt(v) for v >= 0 with derivative 0 at v = 0 (torch.sqrt's is infinite there and would give 0 * inf)."""
    positive = v > 0
    return torch.where(positive, v, torch.ones_like(v)).sqrt() * positive


def init_state(x, config: LMConfig) -> tuple:
    """The optimizer state before step 0: zeros (Adam's m and v, or the momentum)."""
    return tuple(torch.zeros_like(x) for _ in range(config.n_state))


def project(x, x0, config: LMConfig):
    """Onto the ball of `radius` around x0, per image (+ the clamp to [-1, 1] if config.clamp)."""
    d, r = x - x0, config.radius
    if config.ball == "linf":
        x = x0 + kinks.clamp(d, -r, r)  # a face of the ball (|d| = r) passes d through
    else:
        norm = _image_norm(d, 2)
        # inside branch (identity) on the boundary; the floor keeps the unused branch finite at norm = 0
        x = x0 + d * torch.where(norm > r, r / kinks.clamp(norm, lo=r), torch.ones_like(norm))
    return kinks.clamp(x, -1.0, 1.0) if config.clamp else x


def update(x, state: tuple, g, k: int, x0, config: LMConfig):
    """One LM step k (0-based): (x_k, state_k, g_k) -> (x_{k+1}, state_{k+1}), projected around x0."""
    if config.rule == "adam":  # torch.optim.Adam: raw moments as state, bias-corrected in the step
        (m, v), (b1, b2) = state, config.betas
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        step = (m / (1.0 - b1 ** (k + 1))) / (_sqrt0(v / (1.0 - b2 ** (k + 1))) + config.adam_eps)
        state = (m, v)
    else:
        p = 1 if config.rule == "sign" else 2
        tiny = torch.finfo(g.dtype).tiny
        (m,) = state
        m = config.momentum * m + g / kinks.clamp(_image_norm(g, p), lo=tiny)
        step = m.sign() if config.rule == "sign" else m
        state = (m,)
    return project(x - config.lr * step, x0, config), state


def solve(x0, eps_model, classifier, config: LMConfig, draws: LMDraws, record: list | None = None,
          callback=None) -> torch.Tensor:
    """x_M of the M LM steps from states x0 (B, ...) in [-1, 1], one (t, eps) set per step from `draws`.

    record: appended (x_k, *state_k) before each step (the adjoint's trajectory); callback({'k', 'x'}) after it.
    """
    x, state = x0, init_state(x0, config)
    for k in range(config.n_steps):
        t, eps = draws.step(k)
        g = objective_grad(x, t, eps, eps_model, classifier, config)
        if record is not None:
            record.append((x, *state))
        x, state = update(x, state, g, k, x0, config)
        if callback is not None:
            callback({"k": k, "x": x})
    return x


# ----------------------------------------------------------------------------------------------- the adjoint
def step_vjp(k, x_k, state_k, x0, a_x, a_state, eps_model, classifier, config, draws, with_hessian):
    """One step back: the VJP of (x_k, state_k, x0) -> (x_{k+1}, state_{k+1}) with the adjoints (a_x, a_state).

    Recomputes step k's graph (g_k with create_graph: the Hessian-vector products of L) from the saved
    state and the regenerated draws.  a_state entries may be None (the last step's moments are unused).
    Returns (a_x, a_state, a_x0) at step k.
    """
    t, eps = draws.step(k)
    with torch.enable_grad():
        leaves = [x_k.detach().requires_grad_(True), *(s.detach().requires_grad_(True) for s in state_k),
                  x0.detach().requires_grad_(True)]
        g = objective_grad(leaves[0], t, eps, eps_model, classifier, config, create_graph=True,
                           detach_guidance=not with_hessian)
        x_next, state_next = update(leaves[0], tuple(leaves[1:-1]), g, k, leaves[-1], config)
        pairs = [(out, a) for out, a in zip((x_next, *state_next), (a_x, *a_state)) if a is not None]
        grads = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
    return grads[0], grads[1:-1], grads[-1]


class LMSolve(torch.autograd.Function):
    """Forward: the M LM steps.  Backward: their adjoint, k = M-1 .. 0, one step's graph recomputed at a time.

    Saves only the trajectory (x_k, *state_k), k < M: 3M tensors for Adam, 2M otherwise.
    with_hessian=False is the detached-guidance gradient.
    """

    @staticmethod
    def forward(ctx, x0, eps_model, classifier, config, draws, with_hessian):
        record = []
        out = solve(x0, eps_model, classifier, config, draws, record=record)
        ctx.save_for_backward(*(tensor for step in record for tensor in step))
        ctx.nets, ctx.config, ctx.draws, ctx.with_hessian = (eps_model, classifier), config, draws, with_hessian
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        config, width = ctx.config, 1 + ctx.config.n_state
        saved = ctx.saved_tensors  # unpack once
        x0 = saved[0]
        a_x, a_state, a_x0 = grad_out.contiguous(), [None] * config.n_state, torch.zeros_like(grad_out)
        for k in reversed(range(config.n_steps)):
            x_k, *state_k = saved[k * width:(k + 1) * width]
            a_x, a_state, a_centre = step_vjp(k, x_k, state_k, x0, a_x, a_state, *ctx.nets, config, ctx.draws,
                                              ctx.with_hessian)
            a_x0 = a_x0 + a_centre
        return a_x + a_x0, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ entry points
def _validate(x, eps_model, classifier, config, gradient, seed, draws, generator):
    if not torch.is_tensor(x) or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x: expected a float32 or float64 tensor, got "
                         f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or Inf")
    if not isinstance(config, LMConfig):
        raise ValueError(f"config: expected an LMConfig, got {type(config).__name__}")
    if not callable(eps_model):
        raise ValueError(f"eps_model: expected a callable (x, t_index) -> eps, got {type(eps_model).__name__}")
    if config.lam > 0 and not callable(classifier):
        raise ValueError(f"classifier: guidance (lam = {config.lam} > 0) needs a callable classifier, got "
                         f"{type(classifier).__name__}")
    if not isinstance(gradient, str) or gradient not in GRADIENTS:
        raise ValueError(f"gradient: expected one of {GRADIENTS}, got {gradient!r}")
    if seed is not None and not (_is_int(seed) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed: expected an integer in [0, 2^64), got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if torch.is_inference_mode_enabled():
        raise ValueError("x: LM takes gradient steps on x, which torch.inference_mode() forbids; use torch.no_grad()")
    if draws is None:
        return
    if seed is not None:
        raise ValueError("draws: pass explicit draws or a seed, not both")
    if not (isinstance(draws, (tuple, list)) and len(draws) == 2 and all(map(torch.is_tensor, draws))):
        raise ValueError(f"draws: expected a pair of tensors (t, eps), got {type(draws).__name__}")
    t, eps = draws
    lead = (config.n_steps, config.n_draws, x.shape[0])
    if tuple(t.shape) != lead or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"draws: expected t of shape {lead} (n_steps, n_draws, B) and an integer dtype, got "
                         f"{tuple(t.shape)} {t.dtype}")
    if int(t.min()) < 0 or int(t.max()) >= DDPM_STEPS:
        raise ValueError(f"draws: expected t in 0..{DDPM_STEPS - 1}, got values in [{int(t.min())}, {int(t.max())}]")
    if tuple(eps.shape) != lead + tuple(x.shape[1:]) or not eps.is_floating_point():
        raise ValueError(f"draws: expected eps of shape {lead + tuple(x.shape[1:])} and a float dtype, got "
                         f"{tuple(eps.shape)} {eps.dtype}")
    if not torch.isfinite(eps).all():
        raise ValueError("draws: eps contains NaN or Inf")


def lm_solve(x, eps_model, classifier, config: LMConfig = LMConfig(), *, seed=None, draws=None, generator=None,
             gradient="exact", rows=None):
    """LM purification of states x (B, ...) in [-1, 1]: x_M, x's shape (clamped to [-1, 1] only if config.clamp).

    eps_model(x_t, t) -> eps on integer DDPM indices t (B,) (DDPMUNet's convention; `index_eps_model` adapts a
    continuous score model); classifier(u) -> logits for u = (x + 1)/2 in [0, 1] (None when lam = 0).  The draws
    are the Philox stream of `seed` (drawn from `generator` when None) or explicit `draws` = (t, eps).
    gradient: 'exact', 'detached-guidance' or 'bpda' (module docstring).  Plugs into solver.pipeline as the
    solve: `lambda state: lm_solve(state, ...)`.  rows = (ids, width): draw as rows `ids` of a virtual batch of
    `width` images (LMDraws; purify's `rows`).
    """
    _validate(x, eps_model, classifier, config, gradient, seed, draws, generator)
    stream = LMDraws(x, config, seed=seed, draws=draws, generator=generator, rows=rows)
    if gradient == "bpda" or not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            out = solve(x, eps_model, classifier, config, stream)
        return x + (out - x).detach() if gradient == "bpda" and x.requires_grad else out
    return LMSolve.apply(x, eps_model, classifier, config, stream, gradient == "exact")

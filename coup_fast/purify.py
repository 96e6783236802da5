"""COUP purification (Algorithm 1 of arXiv 2408.05900) with exact, memory-bounded gradients."""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .guidance import confidence_grad, image_to_state, state_to_image
from .noise import draw_seed, rng_table
from .sde import DIFFUSION_SCHEDULES, ReverseGrid, ddpm_index, diffuse, euler_maruyama_step

MODES = ("coup", "reverse", "diffpure")
MEMORY = ("lean", "fast")
GRADIENTS = ("exact", "adjoint", "bpda", "detached-guidance")
RANGE_TOL = 1e-4  # [0, 1] inputs may carry float round-off of this size, no more


@dataclass(frozen=True)
class Setting:
    """Everything the solve needs besides the tensors: grid, guidance weight, mode."""

    grid: ReverseGrid
    lam: float
    mode: str
    diffusion: str = "ddpm"  # DiffPure's forward marginal (mode 'diffpure' only): sde.DIFFUSION_SCHEDULES

    @property
    def n_noise(self) -> int:
        """Number of standard-normal draws of x's shape: N steps (+1 for DiffPure's forward diffusion)."""
        return self.grid.n_steps + (self.mode == "diffpure")


def _model_device(model):
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Layers whose output depends on train/eval mode: in training mode every forward (and every
# recompute of the exact gradient) draws new dropout masks or updates batch-norm statistics.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def _warn_if_training(name, model):
    if isinstance(model, nn.Module) and any(m.training for m in model.modules() if isinstance(m, _MODE_DEPENDENT)):
        warnings.warn(f"{name} has dropout or batch-norm layers in training mode: purification is then random "
                      f"beyond its noise, gradients do not match the forward that ran, and batch-norm statistics "
                      f"change; call {name}.eval()", stacklevel=4)


def validate(x, score_model, classifier, *, t_star, lam, dt, mode, gradient, noise, image_range=True,
             memory="lean", diffusion="ddpm") -> Setting:
    """Check every argument of `purify`; raise ValueError naming the argument and what was expected."""
    if not torch.is_tensor(x):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        # The state is integrated in x's dtype: half precision cannot resolve steps of beta h ~ 1e-3.
        # Low-precision networks go through coup_fast.precision (bf16 autocast), the state stays fp32.
        raise ValueError(f"x: expected float32 or float64 (the SDE state's dtype), got {x.dtype}")
    if x.ndim not in (2, 4):
        raise ValueError(f"x: expected a batch of images (B, C, H, W) or vectors (B, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x: the batch is empty")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or Inf")
    if image_range:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
            raise ValueError(f"x: expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(gradient, str) or gradient not in GRADIENTS:
        raise ValueError(f"gradient: expected one of {GRADIENTS}, got {gradient!r}")
    if not isinstance(memory, str) or memory not in MEMORY:
        raise ValueError(f"memory: expected one of {MEMORY}, got {memory!r}")
    if not (_is_real(t_star) and 0.0 < t_star <= 1.0):
        raise ValueError(f"t_star: expected a number in (0, 1], got {t_star!r}")
    if not (_is_real(dt) and 0.0 < dt <= t_star):
        raise ValueError(f"dt: expected 0 < dt <= t_star = {t_star}, got {dt!r}")
    if not (_is_real(lam) and math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    if not isinstance(diffusion, str) or diffusion not in DIFFUSION_SCHEDULES:
        raise ValueError(f"diffusion: expected one of {DIFFUSION_SCHEDULES}, got {diffusion!r}")
    if mode == "diffpure" and diffusion == "ddpm":
        ddpm_index(float(t_star))  # DiffPure's discrete schedule diffuses to step 1000 t*: t* on that grid
    for name, model in (("score_model", score_model), ("classifier", classifier)):
        if model is None and name == "score_model":
            raise ValueError("score_model: expected a callable (x, t) -> score, got None")
        if model is not None and not callable(model):
            raise ValueError(f"{name}: expected a callable, got {type(model).__name__}")
        dev = _model_device(model)
        if dev is not None and dev != x.device:
            raise ValueError(f"{name}: its parameters are on {dev} but x is on {x.device}; move one of them")
        _warn_if_training(name, model)
    effective_lam = float(lam) if mode == "coup" else 0.0
    if effective_lam > 0.0 and classifier is None:
        raise ValueError("classifier: guidance (mode='coup', lam > 0) needs a classifier, got None")
    if effective_lam > 0.0 and torch.is_inference_mode_enabled():
        raise ValueError("lam: the guidance is a gradient of the classifier, which torch.inference_mode() forbids; "
                         "run purify under torch.no_grad() instead")
    setting = Setting(ReverseGrid.from_dt(float(t_star), float(dt)), effective_lam, mode, diffusion)
    if abs(setting.grid.h - dt) > 0.01 * dt:
        warnings.warn(f"dt = {dt} does not divide t_star = {t_star}: running N = {setting.grid.n_steps} steps of "
                      f"h = {setting.grid.h:.4g}", stacklevel=3)
    if noise is not None:
        expected = (setting.n_noise, *x.shape)
        if not torch.is_tensor(noise) or tuple(noise.shape) != expected:
            got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            what = "N + 1 (first draw: the forward diffusion)" if mode == "diffpure" else "N"
            raise ValueError(f"noise: expected shape {expected} ({what} draws of x's shape, N = {setting.grid.n_steps}), got {got}")
        if not noise.is_floating_point():
            raise ValueError(f"noise: expected a floating dtype (standard normal draws), got {noise.dtype}")
        if noise.device != x.device:
            raise ValueError(f"noise: expected on {x.device}, got {noise.device}")
        if not torch.isfinite(noise).all():
            raise ValueError("noise: contains NaN or Inf")
    return setting


class Noise:
    """Where z_k comes from: a given tensor (validation) or the counter-based stream of one seed."""

    def __init__(self, like: torch.Tensor, setting: Setting, noise=None, generator=None):
        self.tensor = None if noise is None else noise.to(like.dtype)
        self.seed = None if noise is not None else draw_seed(generator)
        # Steps use counters k = 0..N-1; DiffPure's forward draw uses counter N.
        self.table = None if noise is not None else rng_table(self.seed, setting.grid.n_steps + 1, like.device)
        self.offset = int(setting.mode == "diffpure")

    def diffusion_eps(self, like):
        # detach: the draw depends on the shape of x, never on its values
        return self.tensor[0] if self.tensor is not None else ops.normal_noise(like.detach(), self.table[-1])

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float):
        if self.tensor is not None:
            return euler_maruyama_step(x, score, guidance, beta_dt, lam, self.tensor[self.offset + k])
        return ops.em_step(x, score, guidance, self.table[k], beta_dt, lam)

    def step_noise(self, like, setting: Setting) -> torch.Tensor:
        """The N step draws as one (N, *shape) tensor (for the torchsde reference path)."""
        if self.tensor is not None:
            return self.tensor[self.offset:]
        return torch.stack([ops.normal_noise(like.detach(), self.table[k]) for k in range(setting.grid.n_steps)])


def batch_time(x, t: float):
    """t as the (B,) tensor a score model takes: every image of a step shares one time."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def drift_terms(x, t: float, score_model, classifier, lam: float, *, create_graph=False):
    """Score s(x, t) and guidance g = grad_x log max_y p(y|x) (None when lam = 0)."""
    score = score_model(x, batch_time(x, t))
    guidance = confidence_grad(classifier, x, create_graph=create_graph, log_confidence=ops.log_confidence) if lam > 0 else None
    return score, guidance


class EagerNetworks:
    """A step's network calls, run eagerly with autograd (the default).

    compiled.CompiledNetworks has the same two methods; the solver and the adjoint call only these.
    """

    def __init__(self, score_model, classifier):
        self.score_model, self.classifier = score_model, classifier

    def drift_terms(self, x, t: float, lam: float, create_graph=False):
        return drift_terms(x, t, self.score_model, self.classifier, lam, create_graph=create_graph)

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        return adjoint_vjp(x_k, a, t, self.score_model, self.classifier, lam, with_hessian)


def solve(x, score_model, classifier, setting: Setting, source: Noise, *, create_graph=False, trajectory=None,
          keep_graphs=None, callback=None, nets=None):
    """Run the guided reverse SDE from t* to 0 on states x in [-1, 1] (Eq. 5, Euler-Maruyama).

    With create_graph=True every step stays on the autograd tape (the unrolled reference);
    otherwise the caller runs it under no_grad.  `trajectory`, a list, receives x_0 .. x_{N-1}.
    keep_graphs ('score' or 'hessian') makes `trajectory` receive each step's network graph
    instead (a KeptStep; 'hessian' keeps the guidance differentiable), for the memory='fast'
    adjoint.  `callback({'k', 't', 'x'})` is called after each step.  `nets`: the networks'
    calls (EagerNetworks of the two models by default, or a compiled.CompiledNetworks).
    """
    grid, nets = setting.grid, nets or EagerNetworks(score_model, classifier)
    for k in range(grid.n_steps):
        t_k = grid.t(k)
        if keep_graphs:
            kept = KeptStep.record(x, t_k, nets, setting.lam, keep_graphs == "hessian")
            trajectory.append(kept)
            score, guidance = kept.drift_terms()
        else:
            if trajectory is not None:
                trajectory.append(x)
            score, guidance = nets.drift_terms(x, t_k, setting.lam, create_graph=create_graph)
        if k == 0 and score.shape != x.shape:  # the pure-torch step would broadcast it silently
            raise ValueError(f"score_model: expected a score of x's shape {tuple(x.shape)}, got {tuple(score.shape)}")
        x = source.step(x, score, guidance, k, grid.beta_dt(k), setting.lam)
        if callback is not None:
            callback({"k": k, "t": t_k, "x": x})
    return x


@dataclass
class KeptStep:
    """One step's network graph, kept from the forward so the adjoint needs no recompute."""

    x: torch.Tensor  # the leaf x_k
    score: torch.Tensor
    guidance: torch.Tensor | None
    used: bool = False  # the graph is freed by its one backward; a second backward recomputes

    @classmethod
    def record(cls, x, t, nets, lam, with_hessian):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            score, guidance = nets.drift_terms(leaf, t, lam, create_graph=with_hessian)
        return cls(leaf, score, guidance)

    def drift_terms(self):
        return self.score.detach(), None if self.guidance is None else self.guidance.detach()

    def vjp(self, a, lam, with_hessian):
        with torch.enable_grad():  # backward passes run under no_grad
            objective = (self.score * a).sum()
            if self.guidance is not None and with_hessian:
                objective = objective + lam * (self.guidance * a).sum()
            (vjp,) = torch.autograd.grad(objective, self.x)
        self.used = True
        return vjp


def adjoint_vjp(x_k, a, t: float, score_model, classifier, lam: float, with_hessian: bool):
    """J_s(x_k)^T a + lam H(x_k) a, recomputing one step's network graph (DESIGN.md)."""
    with torch.enable_grad():
        x_k = x_k.detach().requires_grad_(True)
        objective = (score_model(x_k, batch_time(x_k, t)) * a).sum()
        if lam > 0 and with_hessian:
            guidance = confidence_grad(classifier, x_k, create_graph=True, log_confidence=ops.log_confidence)
            objective = objective + lam * (guidance * a).sum()
        (vjp,) = torch.autograd.grad(objective, x_k)
    return vjp


def adjoint_solve(trajectory, a, score_model, classifier, setting: Setting, with_hessian: bool, steps=None,
                  nets=None):
    """The discrete adjoint: from a = dL/dx_N walk k = N-1..0 over the stored states x_k.

    a_k = a_{k+1} + beta_k h (a_{k+1}/2 + J_s^T a_{k+1} + lam H a_{k+1}); returns dL/dx_0
    (or the adjoint after the first `steps` backward steps, for warm-ups).  `nets`: as in `solve`.
    """
    grid, lam, nets = setting.grid, setting.lam, nets or EagerNetworks(score_model, classifier)
    for k in list(reversed(range(grid.n_steps)))[:steps]:
        step = trajectory[k]
        if isinstance(step, KeptStep) and not step.used:
            vjp = step.vjp(a, lam, with_hessian)
        else:  # memory='lean', or a second backward (retain_graph=True) through memory='fast'
            x_k = step.x if isinstance(step, KeptStep) else step
            vjp = nets.vjp(x_k, a, grid.t(k), lam, with_hessian)
        a = ops.adjoint_update(a, vjp.to(a.dtype), grid.beta_dt(k))
    return a


class _ExactSolve(torch.autograd.Function):
    """Forward: the solve.  Backward: the discrete adjoint, walking k = N-1..0.

    memory='lean' keeps only x_0..x_{N-1} and recomputes one step's graph at a time (memory: the
    trajectory plus one step's activations); memory='fast' keeps every step's graph from the
    forward (N steps of activations, no recompute).  with_hessian=False is the paper's
    detached-guidance gradient."""

    @staticmethod
    def forward(ctx, x, score_model, classifier, setting, source, with_hessian, memory, nets):
        trajectory = []
        keep = ("hessian" if with_hessian else "score") if memory == "fast" else None
        with torch.no_grad():
            out = solve(x, score_model, classifier, setting, source, trajectory=trajectory, keep_graphs=keep,
                        nets=nets)
        if keep:
            ctx.kept = trajectory
        else:
            ctx.save_for_backward(*trajectory)
        ctx.models, ctx.setting, ctx.with_hessian, ctx.nets = (score_model, classifier), setting, with_hessian, nets
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # unpack once: each access of saved_tensors unpacks (and version-checks) all N
        trajectory = ctx.kept if hasattr(ctx, "kept") else ctx.saved_tensors
        a = adjoint_solve(trajectory, grad_out.contiguous(), *ctx.models, ctx.setting, ctx.with_hessian, nets=ctx.nets)
        return a, None, None, None, None, None, None, None


def purify_state(x, score_model, classifier, setting: Setting, source: Noise, gradient: str = "exact",
                 memory: str = "lean", nets=None):
    """The purifier on states in [-1, 1]: start point (mode), solve, gradient method."""
    if gradient == "bpda":  # straight-through: forward as usual, identity Jacobian
        with torch.no_grad():
            out = purify_state(x, score_model, classifier, setting, source, nets=nets)
        return x + (out - x).detach()
    if setting.mode == "diffpure":
        x = diffuse(x, setting.grid.t_star, source.diffusion_eps(x), setting.diffusion)
    if gradient == "adjoint":  # the published attack, its forward included (reference.solve_published)
        from .reference import solve_published

        step_noise = None if source.tensor is None else source.tensor[source.offset:]
        return solve_published(x, score_model, classifier, setting, noise=step_noise, seed=source.seed,
                               adjoint=x.requires_grad)
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            return solve(x, score_model, classifier, setting, source, nets=nets)
    return _ExactSolve.apply(x, score_model, classifier, setting, source, gradient == "exact", memory, nets)


def purify(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", generator=None, noise=None,
           gradient="exact", memory="lean", engine="auto", diffusion="ddpm"):
    """Purify images with COUP (Eq. 5 / Algorithm 1 of arXiv 2408.05900); differentiable in x.

    x: (B, C, H, W) or (B, D) float images in [0, 1].  score_model(x, t) -> score, x in [-1, 1],
    t of shape (B,).  classifier(u) -> logits for u in [0, 1] (may be None when lam = 0).
    mode: 'coup' (start at x, guidance lam), 'reverse' (lam = 0), 'diffpure' (diffuse to t*
    first, lam = 0).  N = round(t*/dt) steps.  diffusion: DiffPure's forward marginal, 'ddpm' (its
    code's discrete schedule, alpha_bar at step 1000 t*; t* on the 1/1000 grid) or 'vp' (the
    continuous alpha(t*), sigma(t*)).  noise: optional (N, *x.shape) standard normals
    ((N + 1, ...) for 'diffpure', draw 0 diffusing) used as z_k exactly; otherwise a seed is
    drawn from `generator` (torch's global RNG if None).  gradient: 'exact' (discrete adjoint),
    'adjoint' (the published COUP / DiffPure attack, reproduced with its forward: torchsde
    sdeint_adjoint, Euler, dt, BrownianInterval, path from t* to 1e-5, guidance detached; not an exact
    gradient; coup_fast.reference.solve_published), 'bpda' (straight-through), 'detached-guidance'
    (purify's own solve with the guidance constant in the backward pass).  memory: 'lean' (exact gradient
    stores the trajectory and recomputes one step's graph at a time) or 'fast' (keeps every
    step's graph: no recompute, N steps of activations).  Every gradient is with respect to x:
    model parameters are constants (their .grad is never touched); torch.autograd only, not
    torch.func transforms.
    engine: 'auto' (default: CUDA tensors run the CUDA-graph engine, coup_fast.graphs, bitwise equal
    to the eager one; models that cannot be captured fall back to eager with a warning), 'eager' or
    'graph' (as 'auto', and warns when the call cannot use graphs, e.g. CPU tensors), or 'compile'
    (any device: each step's network calls, guidance and the adjoint's Hessian-vector product
    included, run as torch.compile'd functions, coup_fast.compiled; the first call per model pair
    and shape compiles for tens of seconds).
    Returns purified images in [0, 1] (the final state mapped back and clamped), x's shape.
    """
    setting = validate(x, score_model, classifier, t_star=t_star, lam=lam, dt=dt, mode=mode, gradient=gradient,
                       noise=noise, memory=memory, diffusion=diffusion)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    # --- engine hook: CUDA-graph-captured loops (coup_fast/graphs.py); None = not capturable, run eager ---
    from . import graphs

    if graphs.use_graph(engine, x, noise, gradient):
        out = graphs.purify_graph(x, score_model, classifier, setting, generator, gradient)
        if out is not None:
            return out
    # --- end of engine hook ---
    nets = None
    if engine == "compile":
        from .compiled import compiled_networks

        nets = compiled_networks(score_model, classifier)
    source = Noise(x, setting, noise, generator)
    out = purify_state(image_to_state(x), score_model, classifier, setting, source, gradient, memory, nets)
    return state_to_image(out).clamp(0.0, 1.0)


class PurifiedClassifier(nn.Module):
    """classifier(purify(x)) as one module: a drop-in for AutoAttack and PGD loops.

    Every call draws fresh noise (pass generator= for a reproducible sequence of calls).
    """

    def __init__(self, score_model, classifier, **purify_kwargs):
        super().__init__()
        self.score_model, self.classifier = score_model, classifier
        self.purify_kwargs = purify_kwargs
        if "gradient" in purify_kwargs and purify_kwargs["gradient"] not in GRADIENTS:
            raise ValueError(f"gradient: expected one of {GRADIENTS}, got {purify_kwargs['gradient']!r}")
        if "engine" in purify_kwargs:
            from .graphs import check_engine

            check_engine(purify_kwargs["engine"])

    def purify(self, x):
        return purify(x, self.score_model, self.classifier, **self.purify_kwargs)

    def forward(self, x):
        return self.classifier(self.purify(x))

"""The public API: `purify` and `PurifiedClassifier` (Algorithm 1 of arXiv 2408.05900), with every
argument checked.  The pipeline and the engines below do the work (docs/design.md §4, §6)."""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings

import torch
from torch import nn

from . import engines
from .adjoint import MEMORY, check_memory, free_memory  # noqa: F401  (memory=: "auto", "lean", "fast" or a budget)
from .sde import DIFFUSION_SCHEDULES, ReverseGrid, ddpm_index
from .lm import LMConfig
from .networks import EagerNetworks
from .guidance import image_to_state
from .precision import Precision, PrecisionNet
from .solver import LM_MODE, MODES, NoiseStream, NonFiniteCheck, PurifyConfig, pipeline

GRADIENTS = ("exact", "adjoint", "bpda", "detached-guidance", "exact-bf16")
# Attacker gradients in lower precision (issue 24): 'exact' whose backward-carrying forward and adjoint run the
# networks under this precision knob, while a call without gradient (the evaluation of candidates) purifies in
# the networks' own precision.  NCHW: channels_last did not pay on the digits models on a CPU (README).
LOW_PRECISION_GRADIENTS = {"exact-bf16": Precision("bf16")}
RANGE_TOL = 1e-4  # [0, 1] inputs may carry float round-off of this size, no more


def _model_tensor(model):
    """A module's first parameter (or buffer): where and in which dtype it computes; None for a function."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor
        for tensor in model.buffers():
            return tensor
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


MAX_STEPS = 100_000  # N = t*/dt above this is refused: 1e6 steps take ~25 min per image on a CPU (max_steps= lifts it)


def _check_models(score_model, classifier, x=None):
    for name, model in (("score_model", score_model), ("classifier", classifier)):
        if model is None and name == "score_model":
            raise ValueError("score_model: expected a callable (x, t) -> score, got None")
        if model is not None and not callable(model):
            raise ValueError(f"{name}: expected a callable, got {type(model).__name__}")
        if x is None:
            continue
        tensor = _model_tensor(model)
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name}: its parameters are on {tensor.device} but x is on {x.device}; move one of them")
        weight = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        if weight is not None and weight.is_floating_point() and weight.dtype != x.dtype:
            raise ValueError(f"x: {x.dtype} but the {name}'s parameters are {weight.dtype}; convert one of them "
                             f"(e.g. x.to({weight.dtype}) or {name}.to({x.dtype}))")
        _warn_if_training(name, model)


def check_settings(*, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", gradient="exact", memory="auto", engine="auto",
                   diffusion="ddpm", generator=None, samples=1, check_finite=True, max_steps=MAX_STEPS, lm=None,
                   clamp=None):
    """Check purify's settings (everything but the tensors and the models); raise ValueError naming the
    first bad one.  Returns N, the number of steps."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(gradient, str) or gradient not in GRADIENTS:
        raise ValueError(f"gradient: expected one of {GRADIENTS}, got {gradient!r}")
    if lm is not None and not isinstance(lm, LMConfig):
        raise ValueError(f"lm: expected a coup_fast.lm.LMConfig or None, got {type(lm).__name__}")
    if mode == LM_MODE and gradient == "adjoint":
        raise ValueError(f"gradient: 'adjoint' is the published attack on the SDE purifiers; mode {LM_MODE!r} takes "
                         "'exact', 'detached-guidance' or 'bpda'")
    check_memory(memory)  # raises "memory: expected 'auto', 'lean', 'fast', a budget ..."
    engines.check_engine(engine)
    lm_mode = mode == LM_MODE  # M optimizer steps: t_star and dt are not used, so not checked
    if not lm_mode and not (_is_real(t_star) and 0.0 < t_star <= 1.0):
        raise ValueError(f"t_star: expected a number in (0, 1], got {t_star!r}")
    if not lm_mode and not (_is_real(dt) and 0.0 < dt <= t_star):
        raise ValueError(f"dt: expected 0 < dt <= t_star = {t_star}, got {dt!r}")
    if not (_is_real(lam) and math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    if not isinstance(diffusion, str) or diffusion not in DIFFUSION_SCHEDULES:
        raise ValueError(f"diffusion: expected one of {DIFFUSION_SCHEDULES}, got {diffusion!r}")
    if mode == "diffpure" and diffusion == "ddpm":
        ddpm_index(float(t_star))  # DiffPure's discrete schedule diffuses to step 1000 t*: t* on that grid
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type not in ("cpu", "cuda"):
        raise ValueError(f"generator: a {generator.device.type} generator draws no numbers; give a cpu or cuda one")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples!r}")
    if not isinstance(check_finite, bool):
        raise ValueError(f"check_finite: expected True or False, got {check_finite!r}")
    if clamp is not None and not isinstance(clamp, bool):
        raise ValueError(f"clamp: expected None (the mode's default), True or False, got {clamp!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps: expected an integer >= 1, got {max_steps!r}")
    if lm_mode:
        return (lm or LMConfig()).n_steps
    n_steps = ReverseGrid.from_dt(float(t_star), float(dt)).n_steps
    if n_steps > max_steps:
        raise ValueError(f"dt: t*/dt = {t_star}/{dt} means N = {n_steps:,} steps per purification, above the limit of "
                         f"{max_steps:,} (raise it with max_steps= if you mean it)")
    return n_steps


def _check_size(x, samples: int, n_steps: int, gradient: str) -> None:
    """Refuse, naming the argument, a call whose smallest memory cannot fit: the K B rows of the batch (state, score,
    guidance: 3 copies) and, for a gradient that stores the trajectory, N states of them; the (N + 1, 2) noise table.
    The networks' activations come on top, so this only turns certain allocator failures into clear errors."""
    free = free_memory(x.device)
    row_bytes = x[0].numel() * x.element_size()
    batch = samples * x.shape[0] * row_bytes * 3
    if batch > free:
        raise ValueError(f"samples: {samples:,} samples of {x.shape[0]} images need at least {batch / 2**30:.3g} GiB for "
                         f"the batch alone, {free / 2**30:.3g} GiB are free; purify fewer samples per call (EOT: chunk "
                         "them, coup_fast.attacks' eot_chunk / --eot-chunk)")
    keeps_states = gradient in ("exact", "detached-guidance") and torch.is_grad_enabled() and x.requires_grad
    stored = n_steps * samples * x.shape[0] * row_bytes if keeps_states else 0
    table = (n_steps + 1) * 16 * samples
    if batch + stored + table > free:
        raise ValueError(f"dt: N = {n_steps:,} steps need at least {(batch + stored + table) / 2**30:.3g} GiB (their "
                         f"noise table{' and the stored trajectory of the gradient' if stored else ''}), "
                         f"{free / 2**30:.3g} GiB are free; use a larger dt (or a lower max_steps)")


def check_rows(rows, n: int, device):
    """purify's rows= checked: None, or (ids, width) with n distinct integer ids in [0, width).  Returns None or
    (ids as an int64 tensor on `device`, width)."""
    if rows is None:
        return None
    expected = (f"rows: expected None or (ids, width): the {n} images' distinct row indices in a virtual batch of "
                f"width images")
    if not (isinstance(rows, (tuple, list)) and len(rows) == 2):
        raise ValueError(f"{expected}, got {type(rows).__name__}")
    ids, width = rows
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"{expected}; width is {width!r}")
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or tuple(ids.shape) != (n,):
        raise ValueError(f"{expected}; ids is a {ids.dtype} tensor of shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= width or ids.unique().numel() != n):
        raise ValueError(f"{expected}; ids must be distinct and in [0, {width})")
    return ids.to(device), int(width)


def validate(x, score_model, classifier, *, t_star, lam, dt, mode, gradient, noise, image_range=True,
             memory="auto", diffusion="ddpm", generator=None, samples=1, engine="auto", check_finite=True,
             max_steps=MAX_STEPS, lm=None, rows=None, clamp=None) -> PurifyConfig:
    """Check every argument of `purify`; raise ValueError naming the argument and what was expected."""
    if not torch.is_tensor(x):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError("x: a meta tensor has no values to purify; give x on a real device (cpu, cuda)")
    if x.dtype not in (torch.float32, torch.float64):
        # The state is integrated in x's dtype: half precision cannot resolve steps of beta h ~ 1e-3.
        # Low-precision networks go through coup_fast.precision (bf16 autocast), the state stays fp32.
        raise ValueError(f"x: expected float32 or float64 (the SDE state's dtype), got {x.dtype}")
    if x.ndim not in (2, 4):
        raise ValueError(f"x: expected a batch of images (B, C, H, W) or vectors (B, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x: the batch is empty")
    if x.numel() == 0:
        raise ValueError(f"x: images of shape {tuple(x.shape[1:])} have no pixels")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or Inf")
    if image_range:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
            raise ValueError(f"x: expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    check_settings(t_star=t_star, lam=lam, dt=dt, mode=mode, gradient=gradient, memory=memory, engine=engine,
                   diffusion=diffusion, generator=generator, samples=samples, check_finite=check_finite,
                   max_steps=max_steps, lm=lm, clamp=clamp)
    _check_models(score_model, classifier, x)
    if rows is not None and noise is not None:
        raise ValueError("rows: the draws of explicit noise are given, not drawn for a virtual batch; pass one of them")
    if mode == LM_MODE and noise is not None:
        raise ValueError(f"noise: mode {LM_MODE!r} draws its (t, eps) from a seed (pass a generator); explicit draws go "
                         "to coup_fast.lm.lm_solve(draws=...)")
    effective_lam = float(lam) if mode in ("coup", LM_MODE) else 0.0
    if effective_lam > 0.0 and classifier is None:
        raise ValueError(f"classifier: guidance (mode={mode!r}, lam > 0) needs a classifier, got None")
    if effective_lam > 0.0 and torch.is_inference_mode_enabled():
        raise ValueError("lam: the guidance is a gradient of the classifier, which torch.inference_mode() forbids; "
                         "run purify under torch.no_grad() instead")
    if mode == LM_MODE:  # purify's lam weighs the guidance of the LM objective; the SDE grid is unused (one step)
        lm_config = dataclasses.replace(lm or LMConfig(), lam=effective_lam)
        _check_size(x, samples, 1, gradient)
        return PurifyConfig(ReverseGrid.from_dt(1.0, 1.0), 0.0, mode, diffusion, lm_config, clamp)
    config = PurifyConfig(ReverseGrid.from_dt(float(t_star), float(dt)), effective_lam, mode, diffusion, clamp=clamp)
    _check_size(x, samples, config.grid.n_steps, gradient)
    if abs(config.grid.h - dt) > 0.01 * dt:
        warnings.warn(f"dt = {dt} does not divide t_star = {t_star}: running N = {config.grid.n_steps} steps of "
                      f"h = {config.grid.h:.4g}", stacklevel=3)
    if noise is not None:
        expected = (config.n_draws, samples * x.shape[0], *x.shape[1:])
        if not torch.is_tensor(noise) or tuple(noise.shape) != expected:
            got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            what = "N + 1 (first draw: the forward diffusion)" if mode == "diffpure" else "N"
            per = f" of the {samples} x {x.shape[0]} samples" if samples > 1 else " of x's shape"
            raise ValueError(f"noise: expected shape {expected} ({what} draws{per}, N = {config.grid.n_steps}), got {got}")
        if not noise.is_floating_point():
            raise ValueError(f"noise: expected a floating dtype (standard normal draws), got {noise.dtype}")
        if noise.device != x.device:
            raise ValueError(f"noise: expected on {x.device}, got {noise.device}")
        if not torch.isfinite(noise).all():
            raise ValueError("noise: contains NaN or Inf")
        if noise.requires_grad:
            raise ValueError("noise: it requires grad, but gradients are taken with respect to x only and none "
                             "would reach it; pass noise.detach()")
        if generator is not None:
            raise ValueError("generator: unused when noise is given (the draws are the noise tensor); pass one of them")
    return config


def check_states(states, config: PurifyConfig, gradient: str) -> tuple:
    """purify's `states` checked against the run's N steps: a tuple of distinct step indices in 0 .. N, for the
    SDE modes with a gradient that has intermediate states; raises ValueError naming states otherwise."""
    n = config.grid.n_steps
    if isinstance(states, (str, bytes)) or not hasattr(states, "__iter__"):
        raise ValueError(f"states: expected a sequence of step indices in 0 .. N = {n}, got {states!r}")
    states = tuple(states)
    bad = [k for k in states if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= n]
    if bad or not states:
        raise ValueError(f"states: expected a non-empty sequence of step indices in 0 .. N = {n}, got {states!r}")
    if len(set(states)) != len(states):
        raise ValueError(f"states: each step index once, got {states!r}")
    if config.mode == LM_MODE:
        raise ValueError(f"states: the intermediate states are the SDE solve's; mode {LM_MODE!r} has none")
    if gradient == "adjoint":
        raise ValueError("states: the published attack (gradient='adjoint') differentiates the final state only; "
                         "intermediate states take 'exact', 'detached-guidance' or 'bpda'")
    return tuple(int(k) for k in states)


def purify(x, score_model, classifier, *, t_star=0.1, lam=1.0, dt=1e-3, mode="coup", generator=None, noise=None,
           gradient="exact", memory="auto", engine="auto", diffusion="ddpm", samples=1, check_finite=True,
           max_steps=MAX_STEPS, lm=None, rows=None, states=None, clamp=None):
    """Purify images with COUP (Eq. 5 / Algorithm 1 of arXiv 2408.05900); differentiable in x.

    x: (B, C, H, W) or (B, D) float images in [0, 1].  score_model(x, t) -> score, x in [-1, 1],
    t of shape (B,).  classifier(u) -> logits for u in [0, 1] (may be None when lam = 0).
    mode: 'coup' (start at x, guidance lam), 'reverse' (lam = 0), 'diffpure' (diffuse to t*
    first, lam = 0), or 'likelihood-max' (Sec. 5.2.1's DDPM variant: M optimizer steps on the denoising
    loss of an eps-network on the DDPM index, guided by lam, coup_fast.lm; `lm` = an LMConfig of its
    settings, Chen et al.'s by default; t_star and dt unused).  N = round(t*/dt) steps (at most max_steps).  diffusion: DiffPure's forward
    marginal, 'ddpm' (its code's discrete schedule, alpha_bar at step 1000 t*; t* on the 1/1000 grid)
    or 'vp' (the continuous alpha(t*), sigma(t*)).  noise: optional (N, *x.shape) standard normals
    ((N + 1, ...) for 'diffpure', draw 0 diffusing) used as z_k exactly; otherwise a seed is
    drawn from `generator` (torch's global RNG if None); giving both is an error.
    samples: K independent purifications of x in one batched call, returning (K * B, ...) images,
    sample r in rows r B .. (r + 1) B - 1 with the r-th seed drawn: exactly the draws of K
    sequential calls with the same generator (EOT in one batch).  gradient: 'exact' (discrete adjoint),
    'exact-bf16' (the same adjoint, with the forward that carries it and the adjoint running the networks under
    bf16 autocast: a cheaper, approximate attacker gradient; a call without gradient, e.g. under no_grad,
    purifies in the networks' own precision, bit for bit as 'exact' does),
    'adjoint' (the published COUP / DiffPure attack, reproduced with its forward: torchsde
    sdeint_adjoint's computation, Euler with dt on the path from t* to 1e-5, guidance detached, the
    continuous adjoint reconstructing the path backwards; not an exact gradient; coup_fast.published runs
    it on every engine, equal to torchsde's on the same Brownian motion; its noise is a Brownian path on
    the forward and adjoint grids from the call's seed, or `noise` as increments on the forward grid),
    'bpda' (straight-through), 'detached-guidance'
    (purify's own solve with the guidance constant in the backward pass).  memory (the exact gradient's
    step graphs): 'auto' (default: keep step graphs while they fit a quarter of the device's free
    memory, recompute the other steps), a budget in bytes, a size ('512MiB', '2GB') or a share of free
    memory ('40%') (the same under that budget), 'lean' (store the trajectory, recompute one step's
    graph at a time), all bitwise the same output and gradient; or 'fast' (keep every step's graph: no
    recompute, N steps of activations, equal to the others to round-off); coup_fast.adjoint.  The graph
    engine always recomputes (its captured adjoint is 'lean').  Every gradient is with respect to x:
    model parameters are constants (their .grad is never touched); torch.autograd only, not
    torch.func transforms.
    engine: 'auto' (default: CUDA tensors run the CUDA-graph engine, coup_fast.engines.graph, bitwise
    equal to the eager one; models that cannot be captured fall back to eager with a warning), 'eager' or
    'graph' (as 'auto', and warns when the call cannot use graphs, e.g. CPU tensors), or 'compile'
    (any device: each step's network calls, guidance and the adjoint's Hessian-vector product
    included, run as torch.compile'd functions, coup_fast.engines.compiled; the first call per model pair
    and shape compiles for tens of seconds), or 'torchsde' (gradient='adjoint' only: the published attack
    in torchsde's sdeint_adjoint, the reference, on the same noise as the other engines; other gradients
    run as 'auto').
    check_finite: check the purified images (and, in the backward pass, the gradient) once per call and
    raise a ValueError naming the network that produced NaN or Inf (False skips the check).
    rows: None, or (ids, width): the B images are the rows `ids` (distinct, in [0, width)) of a virtual batch of
    `width` images, and each draws exactly the noise that row would draw in a call of the whole batch, so an image's
    purification does not depend on which others share its call (an evaluation attacks only the images still
    standing, coup_fast.schedule); it runs on the eager or compile engine.
    states: step indices k in 0 .. N (SDE modes): then returns (images, states), states the solve's
    intermediate diffusion states x_k in [-1, 1]-space stacked, (len(states), samples * B, ...): x_0 the
    solve's start (DiffPure's diffused input), x_N its end (unclamped).  They are differentiable in x:
    the discrete adjoint adds the gradient a per-step loss sends to x_k at step k, on every memory
    setting (docs/design.md §3); under 'bpda' each is straight-through from 2x - 1 as the output is.
    The eager and compile engines run it; the graph engine warns and runs eagerly.
    clamp: whether the purified image (x_N + 1)/2 is clamped to [0, 1] before it is returned (a pixel exactly on
    0 or 1 keeps its gradient, one outside gets none); None (default) does what each mode's published code does:
    'coup', 'reverse' and 'likelihood-max' clamp, 'diffpure' does not (NVlabs' DiffPure hands the classifier the
    unclamped image; COUP's fork of it clamps: clamp=True).
    Returns purified images (the final state mapped back to [0, 1] images, clamped as `clamp` says, so DiffPure's
    may leave [0, 1] by default), x's shape ((samples * B, ...) for samples > 1).
    """
    config = validate(x, score_model, classifier, t_star=t_star, lam=lam, dt=dt, mode=mode, gradient=gradient,
                      noise=noise, memory=memory, diffusion=diffusion, generator=generator, samples=samples,
                      engine=engine, check_finite=check_finite, max_steps=max_steps, lm=lm, rows=rows, clamp=clamp)
    rows = check_rows(rows, x.shape[0], x.device)
    if gradient in LOW_PRECISION_GRADIENTS:  # the attacker's networks only where a gradient is taken
        if torch.is_grad_enabled() and x.requires_grad:
            precision = LOW_PRECISION_GRADIENTS[gradient]
            score_model, classifier = (attacker_network(net, precision) for net in (score_model, classifier))
        gradient = "exact"
    if states is not None:
        states = check_states(states, config, gradient)
    if samples > 1:  # the K samples as one batch; the gradient to x sums theirs
        x = x.repeat(samples, *([1] * (x.ndim - 1)))
    engine = engines.select(engine, x, noise, gradient, samples, mode, rows=rows is not None)
    eager = engines.ENGINES["eager"]
    if states is not None and not getattr(engine, "takes_states", False):
        engines.ENGINES["graph"].warn_once(f"coup_fast: purify(states=...) runs the eager engine instead of "
                                           f"{engine.name!r}")
        engine = eager
    stream = NoiseStream(x, config, noise, generator, samples=samples, rows=rows)
    extra = {} if states is None else {"states": states}
    trajectory = []  # purify(states=...): the solve's requested states, kept aside from the pipeline

    def solve_state(state):
        out = engine.solve(state, score_model, classifier, config, stream, gradient, memory, **extra)
        if out is None:  # the graph engine could not capture these models
            out = eager.solve(state, score_model, classifier, config, stream, gradient, memory, **extra)
        if states is not None:
            out, kept = out
            trajectory.append(kept)
        return out

    check = NonFiniteCheck(EagerNetworks(score_model, classifier), config, stream) if check_finite else None
    images = pipeline(x, config, stream, solve_state, gradient, check)
    if states is None:
        return images
    kept = trajectory[0]
    if gradient == "bpda":  # straight-through from the image's state, as the pipeline makes the output
        start = image_to_state(x)
        kept = start + (kept - start).detach()
    return images, kept


_WRAPPERS = "_coup_fast_attacker_networks"  # where a network keeps its wrappers: {precision: PrecisionNet}


def attacker_network(net, precision: Precision):
    """`net` run under `precision` (a PrecisionNet: fp32 in and out, the network's own weights, not a copy).

    The same wrapper on every call, kept on the network itself (not in a module-level table, which would keep
    every network alive), so that the engines' caches keyed by the networks (CUDA graphs, compiled functions)
    hold.  None stays None."""
    if net is None:
        return None
    wrappers = getattr(net, _WRAPPERS, None)
    if wrappers is None:
        wrappers = {}
        try:  # object's setattr: an nn.Module would register it as state
            object.__setattr__(net, _WRAPPERS, wrappers)
        except (AttributeError, TypeError):  # no instance dict: a fresh wrapper each call
            return PrecisionNet(net, precision)
    if precision not in wrappers:
        wrappers[precision] = PrecisionNet(net, precision)
    return wrappers[precision]


# purify's keyword arguments, which PurifiedClassifier takes too (not `states`: it changes what a call returns)
PURIFY_KWARGS = tuple(p for p in tuple(inspect.signature(purify).parameters)[3:] if p != "states")


class PurifiedClassifier(nn.Module):
    """classifier(purify(x)) as one module: a drop-in for AutoAttack and PGD loops.

    Every call draws fresh noise (pass generator= for a reproducible sequence of calls).  The keyword
    arguments are purify's, checked when the module is built.
    """

    def __init__(self, score_model, classifier, **purify_kwargs):
        super().__init__()
        unknown = sorted(set(purify_kwargs) - set(PURIFY_KWARGS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not an argument of purify; expected some of {PURIFY_KWARGS}")
        if purify_kwargs.get("noise") is not None:
            raise ValueError("noise: a PurifiedClassifier draws fresh noise on every call; give generator= instead")
        check_settings(**{k: v for k, v in purify_kwargs.items() if k not in ("noise", "rows")})
        check_rows(purify_kwargs.get("rows"), len(purify_kwargs["rows"][0]) if purify_kwargs.get("rows") else 0, "cpu")
        _check_models(score_model, classifier)
        self.score_model, self.classifier = score_model, classifier
        self.purify_kwargs = purify_kwargs

    def purify(self, x, samples: int = 1, states=None):
        """purify(x) with this module's settings; `samples` and `states` as purify takes them.  With `rows`, a call on
        a batch of another size (AutoAttack attacks the subsets it forms itself) draws as a batch of its own."""
        kwargs = {**self.purify_kwargs, "samples": samples}
        rows = kwargs.get("rows")
        if rows is not None and len(rows[0]) != x.shape[0]:
            kwargs["rows"] = None
        return purify(x, self.score_model, self.classifier, **kwargs, states=states)

    def forward(self, x):
        return self.classifier(self.purify(x))

    def sample_logits(self, x, samples: int):
        """Logits of `samples` independent purifications of x in one batched call: (samples * B, C), sample r
        in rows r B .. (r + 1) B - 1, the same draws as `samples` sequential calls (see purify's samples)."""
        return self.classifier(self.purify(x, samples))

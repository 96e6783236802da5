"""Compiled engine: a step's network calls as torch.compile'd torch.func functions.

On a CPU at small batch the eager engine spends most of its time in the networks, one dispatcher
call per op, and the exact adjoint's Hessian-vector product needs double backward, which
torch.compile cannot compile through autograd (hence precision.py's compile knob stops at lam = 0).
Written with torch.func, the two functions a step needs are plain functions of tensors,

    drift(x, t)  = (s(x, t), grad_x log max_y p(y | (x + 1)/2))      forward step
    vjp(x, a, t) = J_s(x)^T a + lam H(x) a                           lean adjoint step (docs/design.md §3)

and inductor compiles each whole (forward, backward and double backward in one graph): pointwise
ops fused into loops, one Python call per step instead of hundreds of dispatches.  The maths is
the eager engine's (`networks.drift_terms`, `networks.vjp_objective`), with the pure-torch confidence
(guidance.log_max_softmax) that inductor fuses itself; tests compare it with unrolled autograd.
memory='fast' calls drift with grad enabled and keeps its graph: AOTAutograd then compiles the
drift's backward too (guidance's double backward included), and a step's VJP is that backward.

The first call per (models, shape, dtype, grad mode) compiles (tens of seconds on a CPU); later calls
reuse it.  Models must be traceable by torch.compile; weights may change in place between calls.

torch.compile can get the second derivative silently wrong: with a torch.autograd.Function inside
the classifier (e.g. RobustBench's DeepMind WRNs and their custom Swish) the compiled guidance
Hessian-vector product comes out as zero.  So the first Hessian-vector product of each shape is
checked against the eager one; on a mismatch the engine warns and runs those products eagerly.
"""
from __future__ import annotations

import types
import warnings

import torch

from ..adjoint import exact_solve
from ..guidance import classifier_logits, log_max_softmax
from ..networks import EagerNetworks, batch_time, vjp_objective

CACHE_SIZE = 8  # model pairs; the entries keep their models alive, so an id is never reused while cached


def _compile(fn):
    """torch.compile of fn, given a code object of its own.

    torch.compile keeps its compiled variants on the code object, shared by every closure made
    from the same `def`, and stops compiling (falls back to slow eager torch.func) after
    recompile_limit (8) variants.  Model pairs x grad mode x dtype x shape would exhaust one
    shared budget; a code object per CompiledNetworks gives each its own.

    Before torch 2.13 the shapes are static (each batch size compiles once): dynamo makes a
    dimension symbolic once it has seen two sizes at the same source line (in any instance), and
    with symbolic sizes torch 2.11 and 2.12 could not trace the convolution double backward of the
    Hessian products ("Cannot call numel() on tensor with symbolic sizes/strides", on CPU and CUDA):
    a batch of 64 and then an attack's ragged last batch crashed.  From 2.13 on, one dynamic-shape
    compilation serves every later batch size.
    """
    code = fn.__code__.replace()  # an equal but distinct code object
    return torch.compile(types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__),
                         dynamic=None if symbolic_shapes_ok() else False)


def symbolic_shapes_ok(version: str = torch.__version__) -> bool:
    """Whether this torch traces the guidance Hessian products with symbolic batch sizes (2.11 and 2.12
    did not, 2.13 does: tests/test_compiled.py::test_compiled_engine_new_batch_size_is_exact)."""
    return torch.torch_version.TorchVersion(version.split("+")[0]) >= (2, 13)


class CompiledNetworks:
    """The compiled drift and adjoint-VJP functions of one (score model, classifier) pair.

    lam travels as a 0-d tensor, so a sweep over lam reuses one compilation.
    """

    def __init__(self, score_model, classifier):
        def log_confidence(x):
            return log_max_softmax(classifier_logits(classifier, x)).sum()

        guidance = torch.func.grad(log_confidence)

        def score(x, t):
            return score_model(x, t)

        def score_and_guidance(x, t):
            return score_model(x, t), guidance(x)

        def score_dot(x, t, a):
            return vjp_objective(score_model(x, t), None, a, 0.0, False)

        def drift_dot(x, t, a, lam):
            return vjp_objective(score_model(x, t), guidance(x), a, lam, True)

        self._score, self._score_and_guidance = _compile(score), _compile(score_and_guidance)
        self._vjp_score = _compile(lambda x, t, a: torch.func.grad(score_dot)(x, t, a))
        self._vjp_drift = _compile(lambda x, t, a, lam: torch.func.grad(drift_dot)(x, t, a, lam))
        self.eager = EagerNetworks(score_model, classifier)
        self._hessian_ok = {}  # (use, shape, dtype, device) -> the compiled Hessian products agree with eager

    def drift_terms(self, x, t: float, lam: float, create_graph=False):
        """(score, guidance or None when lam = 0), as networks.drift_terms.

        Called with grad enabled on an x that requires grad, both outputs are differentiable
        (guidance to second order) whatever create_graph says: AOTAutograd compiles their backward.
        """
        if lam > 0 and create_graph and torch.is_grad_enabled() and x.requires_grad:  # memory='fast' keeps this
            key = ("kept", tuple(x.shape), x.dtype, x.device)
            if key not in self._hessian_ok:
                self._hessian_ok[key] = self._kept_hessian_agrees(x, t, lam)
            if not self._hessian_ok[key]:
                return self.eager.drift_terms(x, t, lam, create_graph=True)
        tb = batch_time(x, t)
        return self._score_and_guidance(x, tb) if lam > 0 else (self._score(x, tb), None)

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        """J_s(x_k)^T a (+ lam H(x_k) a with_hessian), as networks.adjoint_vjp."""
        tb = batch_time(a, t)
        with torch.no_grad():
            if not (with_hessian and lam > 0):
                return self._vjp_score(x_k.detach(), tb, a)
            key = ("vjp", tuple(a.shape), a.dtype, a.device)
            if self._hessian_ok.get(key) is False:
                return self.eager.vjp(x_k, a, t, lam, True)
            got = self._vjp_drift(x_k.detach(), tb, a, torch.tensor(lam, dtype=a.dtype, device=a.device))
        if key not in self._hessian_ok:
            want = self.eager.vjp(x_k, a, t, lam, True)
            hessian_part = want - self.eager.vjp(x_k, a, t, lam, False)
            self._hessian_ok[key] = _agree(got, want, hessian_part)
            if not self._hessian_ok[key]:
                return want
        return got

    def _kept_hessian_agrees(self, x, t, lam) -> bool:
        """One Hessian-vector product through the compiled guidance's graph against the eager one."""
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)

        def lam_hvp(guidance_of):
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                guidance = guidance_of(leaf)
                if not guidance.requires_grad:  # compiled without a path back to x: a zero second derivative
                    return torch.zeros_like(leaf)
                return lam * torch.autograd.grad((guidance * probe).sum(), leaf)[0]

        got = lam_hvp(lambda v: self._score_and_guidance(v, batch_time(v, t))[1])
        want = lam_hvp(lambda v: self.eager.drift_terms(v, t, lam, create_graph=True)[1])
        return _agree(got, want, want)


def _agree(got, want, hessian_part) -> bool:
    """got equals want up to round-off, judged against the size of the Hessian term (which a broken
    compiled second derivative drops); warns when not."""
    tol = 1e-4 if want.dtype in (torch.float32, torch.bfloat16, torch.float16) else 1e-9
    ok = float((got - want).norm()) <= 1e-3 * float(hessian_part.norm()) + tol * float(want.norm())
    if not ok:
        warnings.warn("engine='compile': the compiled guidance Hessian-vector product disagrees with eager autograd "
                      "(torch.compile mishandles the second derivative of these models, e.g. through a "
                      "torch.autograd.Function in the classifier); running those products eagerly", stacklevel=4)
    return ok


class CompileEngine:
    """engine='compile': the eager solve and adjoint over CompiledNetworks, one per model pair (cached)."""

    name = "compile"

    def __init__(self, max_size: int = CACHE_SIZE):
        self.max_size = max_size
        self._cache: dict = {}  # (id(score), id(classifier)) -> (score, classifier, CompiledNetworks)

    def unsupported(self, x, noise=None, gradient="exact", samples=1) -> str | None:
        return None

    def networks(self, score_model, classifier) -> CompiledNetworks:
        """The cached CompiledNetworks of these two models (built on first use)."""
        key = (id(score_model), id(classifier))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is score_model and hit[1] is classifier:
            return hit[2]
        nets = CompiledNetworks(score_model, classifier)
        while len(self._cache) >= self.max_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (score_model, classifier, nets)
        return nets

    def solve(self, x, score_model, classifier, config, stream, gradient="exact", memory="lean"):
        return exact_solve(x, self.networks(score_model, classifier), config, stream, gradient == "exact", memory)

    def clear(self):
        """Forget every compiled function (torch.compile's own caches are torch._dynamo.reset())."""
        self._cache.clear()


ENGINE = CompileEngine()

"""Compiled engine: a step's network calls as torch.compile'd torch.func functions.

On a CPU at small batch the eager engine spends most of its time in the networks, one dispatcher
call per op, and the exact adjoint's Hessian-vector product needs double backward, which
torch.compile cannot compile through autograd (hence precision.py's compile knob stops at lam = 0).
Written with torch.func, the two functions a step needs are plain functions of tensors,

    drift(x, t)  = (s(x, t), grad_x log max_y p(y | (x + 1)/2))      forward step
    vjp(x, a, t) = J_s(x)^T a + lam H(x) a                           lean adjoint step (docs/design.md §3)
    drift_and_score_vjp(x, a, t) = (s, g, J_s(x)^T a)                a step of the published attack's adjoint (§7)

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
Hessian-vector product comes out as zero; and with torch 2.13 on a CPU, the compiled VJP of the
digits U-Net under bf16 autocast is 30 % off (its forward is right).  So each compiled product (the
score's VJP, the Hessian-vector product, a kept step's graph) is checked against the eager one on its
first use per shape, to the networks' own round-off (precision.network_rounding); on a mismatch the
engine warns and runs those products eagerly.
"""
from __future__ import annotations

import types
import warnings

import torch

from ..adjoint import exact_solve
from ..guidance import classifier_logits, log_max_softmax
from ..networks import EagerNetworks, batch_time, vjp_from_graph, vjp_objective
from ..precision import network_rounding
from ..published import published_solve, stream_path

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

        def score_dot_and_score(x, t, a):  # <s, a> with s as the auxiliary output: its gradient is J_s^T a
            score = score_model(x, t)
            return vjp_objective(score, None, a, 0.0, False), score

        score_vjp = torch.func.grad_and_value(score_dot_and_score, has_aux=True)

        def score_and_vjp(x, t, a):
            vjp, (_, score) = score_vjp(x, t, a)
            return score, vjp

        def score_guidance_and_vjp(x, t, a):
            vjp, (_, score) = score_vjp(x, t, a)
            return score, guidance(x), vjp

        self._score, self._score_and_guidance = _compile(score), _compile(score_and_guidance)
        self._vjp_score = _compile(lambda x, t, a: torch.func.grad(score_dot)(x, t, a))
        self._vjp_drift = _compile(lambda x, t, a, lam: torch.func.grad(drift_dot)(x, t, a, lam))
        self._score_and_vjp, self._score_guidance_and_vjp = _compile(score_and_vjp), _compile(score_guidance_and_vjp)
        self.eager = EagerNetworks(score_model, classifier)
        self.rounding = network_rounding(score_model, classifier)  # relative round-off of low-precision knobs
        self._checked = {}  # (use, hessian, shape, dtype, device) -> the compiled products agree with eager

    def drift_terms(self, x, t: float, lam: float, create_graph=False):
        """(score, guidance or None when lam = 0), as networks.drift_terms.

        Called with grad enabled on an x that requires grad, both outputs are differentiable
        (guidance to second order) whatever create_graph says: AOTAutograd compiles their backward.
        Such a kept graph is checked against eager autograd on its first use per shape (`_kept_agrees`).
        """
        if torch.is_grad_enabled() and x.requires_grad:  # a kept step (memory='fast' or a budget)
            hessian = lam > 0 and create_graph
            key = ("kept", hessian, tuple(x.shape), x.dtype, x.device)
            if key not in self._checked:
                self._checked[key] = self._kept_agrees(x, t, lam, hessian)
            if not self._checked[key]:
                return self.eager.drift_terms(x, t, lam, create_graph=create_graph)
        tb = batch_time(x, t)
        return self._score_and_guidance(x, tb) if lam > 0 else (self._score(x, tb), None)

    def kept_drift_terms(self, x, t: float, lam: float, with_hessian: bool):
        """(score, the step's guidance, the guidance with its graph or None) for a kept step (memory
        budgets), as networks.kept_drift_terms; here the step drifts with the compiled guidance itself
        (the compiled engine equals eager to round-off, not bitwise)."""
        score, guidance = self.drift_terms(x, t, lam, create_graph=with_hessian)
        return score, guidance, guidance if with_hessian else None

    def vjp(self, x_k, a, t: float, lam: float, with_hessian: bool):
        """J_s(x_k)^T a (+ lam H(x_k) a with_hessian), as networks.adjoint_vjp; each compiled product is
        checked against the eager one on its first use per shape."""
        tb = batch_time(a, t)
        hessian = with_hessian and lam > 0
        key = ("vjp", hessian, tuple(a.shape), a.dtype, a.device)
        if self._checked.get(key) is False:
            return self.eager.vjp(x_k, a, t, lam, with_hessian)
        with torch.no_grad():
            if hessian:
                got = self._vjp_drift(x_k.detach(), tb, a, torch.tensor(lam, dtype=a.dtype, device=a.device))
            else:
                got = self._vjp_score(x_k.detach(), tb, a)
        if key not in self._checked:
            want = self.eager.vjp(x_k, a, t, lam, with_hessian)
            hessian_part = want - self.eager.vjp(x_k, a, t, lam, False) if hessian else None
            self._checked[key] = _agree(got, want, hessian_part, self.rounding)
            if not self._checked[key]:
                return want
        return got

    def drift_and_score_vjp(self, x, a, t: float, lam: float):
        """(score, guidance or None, J_s(x)^T a), as networks.drift_and_score_vjp, from one compiled function;
        checked against the eager one on its first use per shape."""
        key = ("published", lam > 0, tuple(a.shape), a.dtype, a.device)
        if self._checked.get(key) is False:
            return self.eager.drift_and_score_vjp(x, a, t, lam)
        tb = batch_time(a, t)
        with torch.no_grad():
            if lam > 0:
                got = self._score_guidance_and_vjp(x.detach(), tb, a)
            else:
                score, vjp = self._score_and_vjp(x.detach(), tb, a)
                got = (score, None, vjp)
        if key not in self._checked:
            want = self.eager.drift_and_score_vjp(x, a, t, lam)
            self._checked[key] = all(_agree(g, w, None, self.rounding) for g, w in zip(got, want) if w is not None)
            if not self._checked[key]:
                return want
        return got

    def _kept_agrees(self, x, t, lam, hessian: bool) -> bool:
        """One VJP through the compiled kept graph (score, and guidance to second order when `hessian`)
        against the eager one, on a fixed probe."""
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            tb = batch_time(leaf, t)
            score, guidance = self._score_and_guidance(leaf, tb) if lam > 0 else (self._score(leaf, tb), None)
            # a guidance compiled without a path back to x (a dropped second derivative) counts as zero
            got = vjp_from_graph(score, guidance if hessian else None, leaf, probe, lam)
        want = self.eager.vjp(x, probe, t, lam, hessian)
        hessian_part = want - self.eager.vjp(x, probe, t, lam, False) if hessian else None
        return _agree(got, want, hessian_part, self.rounding)


def _agree(got, want, hessian_part, rounding: float = 0.0) -> bool:
    """got equals want up to round-off (the networks' own, `rounding`, for low-precision knobs), judged
    against the size of the Hessian term (which a broken compiled second derivative drops) when there
    is one; warns when not."""
    tol = 1e-4 if want.dtype in (torch.float32, torch.bfloat16, torch.float16) else 1e-9
    tol = max(tol, 8 * rounding)
    scale = want if hessian_part is None else hessian_part
    ok = float((got - want).norm()) <= 1e-3 * float(scale.norm()) + tol * float(want.norm())
    if not ok and hessian_part is not None:
        warnings.warn("engine='compile': the compiled guidance Hessian-vector product disagrees with eager autograd "
                      "(torch.compile mishandles the second derivative of these models, e.g. through a "
                      "torch.autograd.Function in the classifier); running those products eagerly", stacklevel=4)
    elif not ok:
        warnings.warn("engine='compile': the compiled score vector-Jacobian product disagrees with eager autograd "
                      "(torch.compile miscompiles these models' backward, as it does the digits U-Net's under bf16 "
                      "autocast on a CPU with torch 2.13); running those products eagerly", stacklevel=4)
    return ok


class CompileEngine:
    """engine='compile': the eager solve and adjoint over CompiledNetworks, one per model pair (cached)."""

    name = "compile"
    takes_states = True  # solve(states=...), as the eager engine (the same adjoint.exact_solve)

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

    def solve(self, x, score_model, classifier, config, stream, gradient="exact", memory="lean", states=()):
        nets = self.networks(score_model, classifier)
        if gradient == "adjoint":  # the published attack (coup_fast.published) over the compiled calls
            return published_solve(x, nets, config, stream_path(stream, config))
        return exact_solve(x, nets, config, stream, gradient == "exact", memory, states)

    def clear(self):
        """Forget every compiled function (torch.compile's own caches are torch._dynamo.reset())."""
        self._cache.clear()


ENGINE = CompileEngine()

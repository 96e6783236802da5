"""The fused ops: one dispatch point over Triton, the C++/CUDA extension and pure torch, registered once.

    em_step(x, score, guidance, rng_row, beta_dt, lam)   x + beta_dt (x/2 + s + lam g) + sqrt(beta_dt) z(seed, k)
    normal_noise(like, rng_row)                          z(seed, k), the counter-based draw (noise.py's recipe)
    adjoint_update(a, vjp, beta_dt)                      a + beta_dt (a/2 + vjp)
    log_confidence(logits)                               log max_y softmax(logits)_y

The first three are the torch.library custom ops coup_fast::{em_step, philox_normal, adjoint_update};
their fake kernels and autograd formulas are registered here, once (docs/design.md §4).  Each op's
implementation runs the first available backend of PREFERENCE for the tensor's device: 'triton'
(coup_fast/kernels, CUDA), 'cuda-ext' / 'cpp' (the extension's raw kernels, torch.ops.coup_fast_ext,
csrc/) or 'torch' (the reference formulas of sde.py and noise.py).  A call that needs neither autograd
nor tracing runs the implementation directly: the same kernels, hence the same bits, without the
custom-op layer's per-call cost.  `backend_info()` reports what is compiled and what each device uses.
"""
from __future__ import annotations

import contextlib

import torch

from . import extension, noise, sde
from .guidance import log_max_softmax
from .kernels import available as triton_available

OPS = ("em_step", "philox_normal", "adjoint_update")
# Backends in order of preference, per device type and op.  On CUDA the Triton step draws its noise in
# the kernel and is fastest in a captured graph; for the backward pass's adjoint_update the extension's
# CUDA kernel costs less per call (24 against 78 us at CIFAR batch 64 on an H200, README), which is
# how the adjoint calls it.
PREFERENCE = {
    "cuda": {"em_step": ("triton", "cuda-ext", "torch"), "philox_normal": ("triton", "cuda-ext", "torch"),
             "adjoint_update": ("cuda-ext", "triton", "torch")},
    "cpu": dict.fromkeys(OPS, ("cpp", "torch")),
}

_CHOICE: dict = {}  # (device type, op) -> backend: asked every step, the answer never changes


def _available(name: str) -> bool:
    if name == "triton":
        return triton_available()
    if name == "cuda-ext":
        return extension.load_extension() and extension.extension_status()["cuda"]
    if name == "cpp":
        return extension.load_extension()
    return name == "torch"


def backend(device, op: str = "em_step") -> str:
    """'triton', 'cuda-ext', 'cpp' or 'torch': who runs `op` on `device` (a device or its type)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    which = _CHOICE.get((kind, op))
    if which is None:
        which = _CHOICE[kind, op] = next((b for b in PREFERENCE.get(kind, {}).get(op, ()) if _available(b)), "torch")
    return which


@contextlib.contextmanager
def force_backend(device_type: str, name: str):
    """Run every op of OPS on `device_type` with backend `name` inside the block (tests and benchmarks:
    e.g. the Triton kernels on CPU tensors under TRITON_INTERPRET=1, or the pure-torch twins)."""
    saved = dict(_CHOICE)
    _CHOICE.update({(device_type, op): name for op in OPS})
    try:
        yield
    finally:
        _CHOICE.clear()
        _CHOICE.update(saved)


def clear_backend_choice():
    """Forget the backends chosen so far (they are chosen again on the next call)."""
    _CHOICE.clear()


def backend_info() -> dict:
    """What is compiled and in use: extension source/error, Triton, per-device backends."""
    status = extension.extension_status()
    info = {
        "torch": torch.__version__,
        "extension": status["source"],
        "extension_cuda": status["cuda"],
        "extension_error": None if status["loaded"] else status["error"],
        "triton": triton_available(),
        "cpu": backend("cpu"),
    }
    if torch.cuda.is_available():
        info["cuda"] = backend("cuda")
        info["cuda_adjoint_update"] = backend("cuda", "adjoint_update")
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _triton():
    from .kernels import adjoint_update, em_step  # imports triton: only where a Triton backend was chosen

    return em_step, adjoint_update


# --------------------------------------------------------------------------- implementations
def _philox_normal_impl(like, rng_row):
    which = backend(like.device, "philox_normal")
    if which == "triton":
        return _triton()[0].philox_normal(like, rng_row)
    if which in ("cpp", "cuda-ext"):
        return torch.ops.coup_fast_ext.philox_normal(like, rng_row)
    seed, k = rng_row.tolist()
    return noise.philox_normal(seed, k, like.shape, dtype=like.dtype, device=like.device)


def _em_step_impl(x, score, guidance, rng_row, beta_dt, lam):
    which = backend(x.device, "em_step")
    if which == "triton":
        return _triton()[0].em_step(x, score, guidance, rng_row, beta_dt, lam)
    if which in ("cpp", "cuda-ext"):
        return torch.ops.coup_fast_ext.em_step(x, score, guidance, rng_row, beta_dt, lam)
    return sde.euler_maruyama_step(x, score, guidance, beta_dt, lam, _philox_normal_impl(x, rng_row))


def _adjoint_update_impl(a, vjp, beta_dt):
    which = backend(a.device, "adjoint_update")
    if which == "triton":
        return _triton()[1].adjoint_update(a, vjp, beta_dt)
    if which in ("cpp", "cuda-ext"):
        return torch.ops.coup_fast_ext.adjoint_update(a, vjp, beta_dt)
    return sde.adjoint_step(a, vjp, beta_dt)


# --------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("coup_fast::philox_normal", mutates_args=())
def _philox_normal_op(like: torch.Tensor, rng_row: torch.Tensor) -> torch.Tensor:
    return _philox_normal_impl(like, rng_row)


@torch.library.custom_op("coup_fast::em_step", mutates_args=())
def _em_step_op(x: torch.Tensor, score: torch.Tensor, guidance: torch.Tensor | None, rng_row: torch.Tensor,
                beta_dt: float, lam: float) -> torch.Tensor:
    return _em_step_impl(x, score, guidance, rng_row, beta_dt, lam)


@torch.library.custom_op("coup_fast::adjoint_update", mutates_args=())
def _adjoint_update_op(a: torch.Tensor, vjp: torch.Tensor, beta_dt: float) -> torch.Tensor:
    return _adjoint_update_impl(a, vjp, beta_dt)


@_philox_normal_op.register_fake
def _(like, rng_row):
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


@_em_step_op.register_fake
def _(x, score, guidance, rng_row, beta_dt, lam):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_adjoint_update_op.register_fake
def _(a, vjp, beta_dt):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


# x_{k+1} is affine in (x, s, g): d/dx = 1 + beta_dt / 2, d/ds = beta_dt, d/dg = lam beta_dt.  Gradients
# take each input's dtype (score and guidance may be bf16 beside an fp32 state).
def _em_setup(ctx, inputs, output):
    x, score, guidance, _, ctx.beta_dt, ctx.lam = inputs
    ctx.dtypes = (x.dtype, score.dtype, None if guidance is None else guidance.dtype)


def _em_backward(ctx, grad):
    x_dtype, s_dtype, g_dtype = ctx.dtypes
    g_guidance = None if g_dtype is None else (grad * (ctx.lam * ctx.beta_dt)).to(g_dtype)
    return ((grad * (1.0 + 0.5 * ctx.beta_dt)).to(x_dtype), (grad * ctx.beta_dt).to(s_dtype), g_guidance,
            None, None, None)


def _adjoint_setup(ctx, inputs, output):
    a, vjp, ctx.beta_dt = inputs
    ctx.dtypes = (a.dtype, vjp.dtype)


def _adjoint_backward(ctx, grad):
    a_dtype, v_dtype = ctx.dtypes
    return (grad * (1.0 + 0.5 * ctx.beta_dt)).to(a_dtype), (grad * ctx.beta_dt).to(v_dtype), None


_em_step_op.register_autograd(_em_backward, setup_context=_em_setup)
_adjoint_update_op.register_autograd(_adjoint_backward, setup_context=_adjoint_setup)


def _through_op(*tensors) -> bool:
    """Does this call need the custom op's autograd or fake kernel (inputs on the tape, or tracing)?"""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- the public functions
def normal_noise(like: torch.Tensor, rng_row: torch.Tensor) -> torch.Tensor:
    """z for the step whose (seed, k) is in the int64 device row rng_row, shaped like `like`; replayable."""
    return _philox_normal_op(like, rng_row) if _through_op() else _philox_normal_impl(like, rng_row)


def em_step(x, score, guidance, rng_row, beta_dt: float, lam: float) -> torch.Tensor:
    """Fused x_{k+1} = x + beta_dt (x/2 + s + lam g) + sqrt(beta_dt) z(seed, k) (sde.euler_maruyama_step);
    differentiable in x, score and guidance.  guidance may be None."""
    if guidance is not None and lam == 0.0:
        guidance = None
    beta_dt, lam = float(beta_dt), float(lam)
    if _through_op(x, score, guidance):
        return _em_step_op(x, score, guidance, rng_row, beta_dt, lam)
    return _em_step_impl(x, score, guidance, rng_row, beta_dt, lam)


def adjoint_update(a, vjp, beta_dt: float) -> torch.Tensor:
    """Fused a + beta_dt (a/2 + vjp) (sde.adjoint_step); differentiable in a and vjp."""
    beta_dt = float(beta_dt)
    if _through_op(a, vjp):
        return _adjoint_update_op(a, vjp, beta_dt)
    return _adjoint_update_impl(a, vjp, beta_dt)


def log_confidence(logits: torch.Tensor) -> torch.Tensor:
    """log max_y softmax(logits): the fused Triton op (twice differentiable) on CUDA, pure torch elsewhere."""
    if logits.is_cuda and triton_available():
        from .kernels.confidence import log_max_softmax as triton_log_max_softmax  # imports triton

        return triton_log_max_softmax(logits)
    return log_max_softmax(logits)

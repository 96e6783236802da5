"""The C++/CUDA extension (csrc/): loading, fake kernels and autograd registration.

The extension registers torch.ops.coup_fast.{em_step, philox_normal, adjoint_update}.
It is normally built by `pip install --no-build-isolation -e .`; when the built module is
missing (or was built against another torch) it is compiled once at first use with
torch.utils.cpp_extension.load; if that fails too, coup_fast runs its pure-torch ops and
`coup_fast.backend_info()` says why.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
_state = {"loaded": False, "source": None, "error": None, "cuda": False}


def _try_import_built() -> bool:
    try:
        from . import _C  # noqa: F401  (the import runs TORCH_LIBRARY registrations)
    except ImportError as err:
        _state["error"] = f"built module: {err}"
        return False
    _state["source"] = "built (setup.py)"
    return True


def _try_jit() -> bool:
    src = _ROOT / "csrc" / "coup_ops.cpp"
    if not src.exists() or os.environ.get("COUP_FAST_NO_JIT") == "1":
        return False
    try:
        from torch.utils.cpp_extension import load

        sources = [str(src)]
        if torch.cuda.is_available():
            sources += [str(p) for p in sorted((_ROOT / "csrc" / "cuda").glob("*.cu"))]
        load(name="coup_fast_jit", sources=sources, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as err:  # compiler missing, headers missing, ...: fall back to pure torch
        _state["error"] = f"{_state['error']}; JIT build: {type(err).__name__}: {str(err)[:300]}"
        return False
    _state["source"] = "JIT (torch.utils.cpp_extension.load)"
    return True


def load_extension() -> bool:
    """Load the ops once; True when torch.ops.coup_fast is usable."""
    if _state["loaded"] or _state["source"] is not None:
        return _state["loaded"]
    if os.environ.get("COUP_FAST_DISABLE_EXT") == "1":
        _state["source"], _state["error"] = "disabled", "COUP_FAST_DISABLE_EXT=1"
        return False
    if _try_import_built() or _try_jit():
        _state["loaded"] = True
        _state["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("coup_fast::em_step", "CUDA")
        _register_python_side()
    else:
        _state["source"] = "unavailable"
    return _state["loaded"]


def extension_status() -> dict:
    load_extension()
    return dict(_state)


def _register_python_side():
    """Fake (meta) kernels for torch.compile and autograd formulas of the linear ops."""
    lib = "coup_fast::"

    @torch.library.register_fake(lib + "em_step")
    def _(x, score, guidance, rng, beta_dt, lam):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "philox_normal")
    def _(x, rng):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "adjoint_update")
    def _(a, vjp, beta_dt):
        return torch.empty_like(a, memory_format=torch.contiguous_format)

    # x_{k+1} is affine in (x, s, g): d/dx = 1 + beta_dt / 2, d/ds = beta_dt, d/dg = lam beta_dt.
    def em_setup(ctx, inputs, output):
        ctx.beta_dt, ctx.lam = inputs[4], inputs[5]
        ctx.has_guidance = inputs[2] is not None

    def em_backward(ctx, grad):
        g_guid = grad * (ctx.lam * ctx.beta_dt) if ctx.has_guidance else None
        return grad * (1.0 + 0.5 * ctx.beta_dt), grad * ctx.beta_dt, g_guid, None, None, None

    torch.library.register_autograd(lib + "em_step", em_backward, setup_context=em_setup)

    def adj_setup(ctx, inputs, output):
        ctx.beta_dt = inputs[2]

    def adj_backward(ctx, grad):
        return grad * (1.0 + 0.5 * ctx.beta_dt), grad * ctx.beta_dt, None

    torch.library.register_autograd(lib + "adjoint_update", adj_backward, setup_context=adj_setup)

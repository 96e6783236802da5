"""The C++/CUDA extension (csrc/): loading it, once.

The extension registers the raw kernels torch.ops.coup_fast_ext.{em_step, philox_normal,
adjoint_update} (one TORCH_LIBRARY schema, CPU and CUDA implementations side by side); the ops that
coup_fast uses, with their fake kernels and autograd, are defined over them in coup_fast/ops.py.
The extension is normally built by `pip install --no-build-isolation .` (or `-e .`); when the built
module is missing (or was built against another torch) it is compiled once at first use with
torch.utils.cpp_extension.load from a source checkout's csrc/; if that fails too, or an installed
package carries no sources, coup_fast runs its pure-torch ops and `coup_fast.backend_info()` says why.
Its load state is this module's `_state`, set once per process.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
_state = {"loaded": False, "source": None, "error": None, "cuda": False}


def _registered() -> bool:
    """Did the loaded module register this version's kernels (a module built from older sources did not)?"""
    return torch._C._dispatch_has_kernel_for_dispatch_key("coup_fast_ext::em_step", "CPU")


def _try_import_built() -> bool:
    try:
        from . import _C  # noqa: F401  (the import runs TORCH_LIBRARY registrations)
    except (ImportError, RuntimeError) as err:  # RuntimeError: registrations that clash (a stale build)
        _state["error"] = f"built module: {err}"
        return False
    if not _registered():
        _state["error"] = "built module: built from older sources (rebuild: pip install --no-build-isolation -e .)"
        return False
    _state["source"] = "built (setup.py)"
    return True


def _try_jit() -> bool:
    src = _ROOT / "csrc" / "coup_ops.cpp"
    if os.environ.get("COUP_FAST_NO_JIT") == "1":
        return False
    if not src.exists():  # an installed package (not a checkout) carries no C++ sources
        _state["error"] = (f"{_state['error']}; no JIT build: {src.parent} is not here (install from a source checkout "
                           "or the sdist with `pip install --no-build-isolation`, torch installed first)")
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
    """Load the kernels once; True when torch.ops.coup_fast_ext is usable."""
    if _state["loaded"] or _state["source"] is not None:
        return _state["loaded"]
    if os.environ.get("COUP_FAST_DISABLE_EXT") == "1":
        _state["source"], _state["error"] = "disabled", "COUP_FAST_DISABLE_EXT=1"
        return False
    if _try_import_built() or _try_jit():
        _state["loaded"] = True
        _state["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("coup_fast_ext::em_step", "CUDA")
    else:
        _state["source"] = "unavailable"
    return _state["loaded"]


def extension_status() -> dict:
    load_extension()
    return dict(_state)

"""The one choice point between fused ops and their pure-torch twins.

CUDA tensors: Triton kernels (coup_fast.kernels) where triton imports, else the CUDA extension;
the adjoint update, the one op of the backward pass, runs the extension's CUDA kernel when it is
built (the C++/CUDA adjoint of the design), else the same fallbacks.
CPU tensors: the C++ extension (OpenMP), else pure torch.  The Triton interpreter is for tests.
`backend_info()` reports what is compiled and what each device uses.
"""
from __future__ import annotations

import torch

from . import _ops, noise, sde
from .guidance import log_max_softmax


def _triton_ok() -> bool:
    try:
        from .kernels import available
    except ImportError:
        return False
    return available()


_BACKENDS: dict[str, str] = {}  # device type -> backend; the ops ask once per step, the answer never changes


def backend(device: torch.device | str) -> str:
    """'triton', 'cuda-ext', 'cpp' or 'torch': who runs the elementwise ops on `device`."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    which = _BACKENDS.get(kind)
    if which is None:
        which = _BACKENDS[kind] = _choose_backend(kind)
    return which


def _choose_backend(kind: str) -> str:
    if kind == "cuda":
        if _triton_ok():
            return "triton"
        return "cuda-ext" if _ops.load_extension() and _ops.extension_status()["cuda"] else "torch"
    if kind == "cpu" and _ops.load_extension():
        return "cpp"
    return "torch"


def adjoint_backend(device: torch.device | str) -> str:
    """Who runs adjoint_update on `device`: the extension's CUDA kernel on CUDA when built, else backend()."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind == "cuda" and _ops.load_extension() and _ops.extension_status()["cuda"]:
        return "cuda-ext"
    return backend(kind)


def backend_info() -> dict:
    """What is compiled and in use: extension source/error, Triton, per-device backends."""
    status = _ops.extension_status()
    info = {
        "torch": torch.__version__,
        "extension": status["source"],
        "extension_cuda": status["cuda"],
        "extension_error": None if status["loaded"] else status["error"],
        "triton": _triton_ok(),
        "cpu": backend("cpu"),
    }
    if torch.cuda.is_available():
        info["cuda"] = backend("cuda")
        info["cuda_adjoint_update"] = adjoint_backend("cuda")
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def normal_noise(like: torch.Tensor, rng_row: torch.Tensor) -> torch.Tensor:
    """z for the step whose (seed, k) is in rng_row, shaped like `like`; replayable."""
    which = backend(like.device)
    if which == "triton":
        from .kernels.em_step import philox_normal as triton_philox_normal

        return triton_philox_normal(like, rng_row)
    if which in ("cpp", "cuda-ext"):
        return torch.ops.coup_fast.philox_normal(like, rng_row)
    seed, k = rng_row.tolist()
    return noise.philox_normal(seed, k, like.shape, dtype=like.dtype, device=like.device)


def em_step(x, score, guidance, rng_row, beta_dt: float, lam: float) -> torch.Tensor:
    """Fused x_{k+1} = x + beta_dt (x/2 + s + lam g) + sqrt(beta_dt) z(seed, k) (sde.euler_maruyama_step)."""
    which = backend(x.device)
    if guidance is not None and lam == 0.0:
        guidance = None
    if which == "triton":
        from .kernels.em_step import em_step as triton_em_step

        return triton_em_step(x, score, guidance, rng_row, beta_dt, lam)
    if which in ("cpp", "cuda-ext"):
        return torch.ops.coup_fast.em_step(x, score, guidance, rng_row, beta_dt, lam)
    z = normal_noise(x, rng_row)
    return sde.euler_maruyama_step(x, score, guidance, beta_dt, lam, z)


def adjoint_update(a, vjp, beta_dt: float) -> torch.Tensor:
    """Fused a + beta_dt (a/2 + vjp) (sde.adjoint_step)."""
    which = adjoint_backend(a.device)
    if which == "triton":
        from .kernels.adjoint_update import adjoint_update as triton_adjoint_update

        return triton_adjoint_update(a, vjp, beta_dt)
    if which in ("cpp", "cuda-ext"):
        return torch.ops.coup_fast.adjoint_update(a, vjp, beta_dt)
    return sde.adjoint_step(a, vjp, beta_dt)


def log_confidence(logits: torch.Tensor) -> torch.Tensor:
    """log max_y softmax(logits): fused Triton op on CUDA, pure torch elsewhere."""
    if logits.is_cuda and backend(logits.device) == "triton":
        from .kernels.confidence import log_max_softmax as triton_log_max_softmax

        return triton_log_max_softmax(logits)
    return log_max_softmax(logits)

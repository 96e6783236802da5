"""Triton kernels: the fused Euler-Maruyama step with in-kernel Philox noise, the adjoint update, and
the softmax confidence with its two derivatives.  coup_fast/ops.py chooses them on CUDA."""
import torch


def available() -> bool:
    """True when triton imports and a CUDA device is present: the ops choose Triton for CUDA tensors only.

    Tests also run these kernels on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set
    by tests/conftest.py), by calling them directly or with coup_fast.ops.force_backend('cpu', 'triton').
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()

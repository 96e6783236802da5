"""Triton kernels (fused Euler-Maruyama step, softmax-confidence gradient)."""


def available() -> bool:
    """True when triton imports and a CUDA device is present (or TRITON_INTERPRET=1 for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()

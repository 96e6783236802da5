"""Fused update of the discrete adjoint (docs/design.md §3), the backward twin of em_step:

    a_k = a_{k+1} + beta_k h (a_{k+1} / 2 + v),   v = J_s^T a_{k+1} + lam H a_{k+1}

Pure-torch twin: sde.adjoint_step.  fp32 math (fp64 for fp64 adjoints); v may be lower precision.
Kernel and host launcher only; the op coup_fast::adjoint_update is registered in coup_fast/ops.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .em_step import _CONFIGS, _acc, _check_like, _join, _launch, split


@triton.jit
def _adjoint_update_kernel(a_ptr, v_ptr, out_ptr, n, beta_hi, beta_lo, ACC: tl.constexpr, BLOCK: tl.constexpr):
    beta_dt = _join(beta_hi, beta_lo, ACC)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (a + beta_dt * (0.5 * a + v)).to(out_ptr.dtype.element_ty), mask=mask)


_adjoint_update_tuned = triton.autotune(_CONFIGS, key=["n", "ACC"])(_adjoint_update_kernel)


def adjoint_update(a: torch.Tensor, vjp: torch.Tensor, beta_dt: float) -> torch.Tensor:
    """Fused a + beta_dt (a/2 + vjp) (sde.adjoint_step), launched: a's dtype, fp32 (fp64) math.  The custom op
    coup_fast::adjoint_update (coup_fast/ops.py, with its fake kernel and autograd) calls this."""
    _check_like(a, vjp=vjp)
    ac, vc = a.contiguous(), vjp.contiguous()
    out = torch.empty_like(ac)
    n = ac.numel()
    if n:
        _launch(_adjoint_update_kernel, _adjoint_update_tuned, n, ac, vc, out, n, *split(float(beta_dt)), ACC=_acc(ac))
    return out

"""Fused softmax confidence log max_y softmax(l)_y, twice differentiable (guidance of Eq. 5).

Three row-wise kernels, one program per row of the (B, C) logits, with p = softmax(l) and
y* = argmax l recomputed from l each time (cheaper than storing p for small C):

    forward          c     = l_{y*} - logsumexp(l)                               (B,)
    backward         dl    = u (e_{y*} - p)                                      u: (B,) upstream
    double backward  dl    = -u (p * W - p (p^T W)),  du = <W, e_{y*} - p>       W: (B, C) upstream

The backward is itself a differentiable op, so confidence_grad(create_graph=True) followed by
autograd gives the Hessian-vector products of the exact adjoint.  Pure-torch twin:
coup_fast.guidance.log_max_softmax.  Math in fp32 (fp64 for fp64 logits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_row(l_ptr, row, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """(cols, mask, p, one-hot e_{y*}, log confidence) of one row."""
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    l = tl.load(l_ptr + row * C + cols, mask=mask, other=-float("inf")).to(ACC)
    m = tl.max(l, axis=0)
    y = tl.argmax(l, axis=0)  # first maximum, as torch.max picks it
    e = tl.where(mask, tl.exp(l - m), 0.0)
    total = tl.sum(e, axis=0)
    one_hot = (cols == y).to(ACC)
    return cols, mask, e / total, one_hot, -tl.log(total)


@triton.jit
def _forward_kernel(l_ptr, out_ptr, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _, _, _, _, conf = _softmax_row(l_ptr, row, C, ACC, BLOCK_C)
    tl.store(out_ptr + row, conf.to(out_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(l_ptr, u_ptr, dl_ptr, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols, mask, p, one_hot, _ = _softmax_row(l_ptr, row, C, ACC, BLOCK_C)
    u = tl.load(u_ptr + row).to(ACC)
    tl.store(dl_ptr + row * C + cols, (u * (one_hot - p)).to(dl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _double_backward_kernel(l_ptr, u_ptr, w_ptr, dl_ptr, du_ptr, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols, mask, p, one_hot, _ = _softmax_row(l_ptr, row, C, ACC, BLOCK_C)
    u = tl.load(u_ptr + row).to(ACC)
    w = tl.load(w_ptr + row * C + cols, mask=mask, other=0.0).to(ACC)
    pw = tl.sum(p * w, axis=0)
    # d/dl <W, u (e - p)> = -u J_softmax W = -u (p * W - p (p^T W)); e_{y*} is locally constant.
    tl.store(dl_ptr + row * C + cols, (-u * (p * w - p * pw)).to(dl_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row, (tl.sum(w * one_hot, axis=0) - pw).to(du_ptr.dtype.element_ty))


def _meta(logits: torch.Tensor) -> dict:
    # One program holds a whole row; C up to a few thousand classes fits in registers.
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    block = max(16, triton.next_power_of_2(logits.shape[1]))
    return {"ACC": acc, "BLOCK_C": block, "num_warps": 4 if block <= 2048 else 8}


def _check(logits):
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected shape (B, C) with C >= 1, got {tuple(logits.shape)}")


@torch.library.custom_op("coup_fast::log_max_softmax", mutates_args=())
def _confidence(logits: torch.Tensor) -> torch.Tensor:
    _check(logits)
    lc = logits.contiguous()
    out = torch.empty(lc.shape[0], dtype=lc.dtype, device=lc.device)
    if lc.shape[0]:
        _forward_kernel[(lc.shape[0],)](lc, out, lc.shape[1], **_meta(lc))
    return out


@torch.library.custom_op("coup_fast::log_max_softmax_backward", mutates_args=())
def _confidence_backward(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    lc, uc = logits.contiguous(), u.contiguous()
    dl = torch.empty_like(lc)
    if lc.shape[0]:
        _backward_kernel[(lc.shape[0],)](lc, uc, dl, lc.shape[1], **_meta(lc))
    return dl


@torch.library.custom_op("coup_fast::log_max_softmax_double_backward", mutates_args=())
def _confidence_double_backward(logits: torch.Tensor, u: torch.Tensor,
                                w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lc, uc, wc = logits.contiguous(), u.contiguous(), w.contiguous()
    dl, du = torch.empty_like(lc), torch.empty_like(uc)
    if lc.shape[0]:
        _double_backward_kernel[(lc.shape[0],)](lc, uc, wc, dl, du, lc.shape[1], **_meta(lc))
    return dl, du


@_confidence.register_fake
def _(logits):
    return logits.new_empty(logits.shape[0])


@_confidence_backward.register_fake
def _(logits, u):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@_confidence_double_backward.register_fake
def _(logits, u, w):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(u)


def _save_logits(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _save_logits_u(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _forward_grad(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _confidence_backward(logits, grad.to(logits.dtype))


def _backward_grad(ctx, grad):
    logits, u = ctx.saved_tensors
    return _confidence_double_backward(logits, u, grad.to(logits.dtype))


_confidence.register_autograd(_forward_grad, setup_context=_save_logits)
_confidence_backward.register_autograd(_backward_grad, setup_context=_save_logits_u)


def log_max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log max_y softmax(l)_y per row: (B, C) logits -> (B,); gradient u (e_{y*} - p), twice differentiable."""
    return _confidence(logits)

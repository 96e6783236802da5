"""Fused guided Euler-Maruyama step with in-kernel Philox noise (Eq. 5 of arXiv 2408.05900).

    x_{k+1} = x_k + beta_k h (x_k / 2 + s + lam g) + sqrt(beta_k h) z_k,   z_k[i] = normal(seed, k * numel + i)

z_k follows exactly the Philox4x32-10 + Box-Muller recipe of coup_fast/noise.py (the pure-torch
twin); sde.euler_maruyama_step is the reference formula.  (seed, k) is loaded from the int64
`rng` row in device memory, never passed as a scalar, so a captured CUDA graph draws new
noise when a new seed is written into the table.  Math in fp32; x is the fp32 state, score and
guidance may be bf16/fp16 (they are upcast on load).  fp64 states are computed in fp64.
Kernels and host launchers only: the ops coup_fast::em_step / philox_normal, their fake kernels and
autograd are registered once, in coup_fast/ops.py.
"""
from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from .. import noise

# Triton kernels may read module globals only when they are constexpr.
PHILOX_A = tl.constexpr(noise.PHILOX_A)
PHILOX_B = tl.constexpr(noise.PHILOX_B)
PHILOX_KEY_A = tl.constexpr(noise.PHILOX_KEY_A)
PHILOX_KEY_B = tl.constexpr(noise.PHILOX_KEY_B)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elementwise and memory bound: a couple of block sizes is all autotuning can find.
_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 4096}, num_warps=8)]
_INTERPRET_BLOCK = 4096  # the interpreter costs ~6 ms per program: few, large programs


@triton.jit
def _philox_normal(seed, offset, ACC: tl.constexpr):
    """Standard normal (dtype ACC) for int64 counters `offset` under int64 key `seed` (noise.py's recipe)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        # 32x32 -> 64 bit products as (umulhi, wrapping low word): no 64-bit multiply needed.
        hi_a = tl.umulhi(c0, PHILOX_A)
        lo_a = c0 * PHILOX_A
        hi_b = tl.umulhi(c2, PHILOX_B)
        lo_b = c2 * PHILOX_B
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    # 24-bit uniforms are exact in fp32: u1 in (0, 1] keeps log finite.  cos(2 pi u2) as in
    # csrc/coup_math.h: 4 u2 = quadrant + f exactly, then +-cos / +-sin of (pi/2) f < pi/2.
    u1 = ((c0 >> 8) + 1).to(tl.int32).to(ACC) * 5.9604644775390625e-08
    quadrant = (c1 >> 30).to(tl.int32)
    angle = ((c1 >> 8) & 0x3FFFFF).to(tl.int32).to(ACC) * 2.384185791015625e-07 * 1.5707963267948966
    trig = tl.where((quadrant & 1) == 1, tl.sin(angle), tl.cos(angle))
    cos_2pi_u2 = tl.where((quadrant == 1) | (quadrant == 2), -trig, trig)
    return tl.sqrt(-2.0 * tl.log(u1)) * cos_2pi_u2


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    """A scalar passed as two fp32 halves (see `split`), rebuilt in ACC."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _em_step_kernel(x_ptr, s_ptr, g_ptr, rng_ptr, out_ptr, n, beta_hi, beta_lo, sqrt_hi, sqrt_lo, lam_hi, lam_lo,
                    HAS_GUIDANCE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    beta_dt, sqrt_beta_dt, lam = _join(beta_hi, beta_lo, ACC), _join(sqrt_hi, sqrt_lo, ACC), _join(lam_hi, lam_lo, ACC)
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: states beyond 2^31 elements stay correct
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(rng_ptr)
    step = tl.load(rng_ptr + 1)
    z = _philox_normal(seed, step * n + offs, ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    drift = 0.5 * x + tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_GUIDANCE:
        drift += lam * tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    out = x + beta_dt * drift + sqrt_beta_dt * z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _philox_normal_kernel(rng_ptr, out_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    z = _philox_normal(tl.load(rng_ptr), tl.load(rng_ptr + 1) * n + offs, ACC)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=offs < n)


_em_step_tuned = triton.autotune(_CONFIGS, key=["n", "HAS_GUIDANCE", "ACC"])(_em_step_kernel)
_philox_normal_tuned = triton.autotune(_CONFIGS, key=["n", "ACC"])(_philox_normal_kernel)


def split(value: float) -> tuple:
    """value as (hi, lo) fp32 with hi + lo = value to ~2^-48 relative.  Triton passes Python floats
    as fp32 scalars; fp64 states need their step sizes in fp64 (hi + lo is exactly hi in fp32 maths)."""
    hi = _to_fp32(value)
    return hi, _to_fp32(value - hi)


def _to_fp32(value: float) -> float:
    if abs(value) >= 3.4e38:  # beyond fp32 (struct refuses): Triton makes it inf, as before
        return value
    return struct.unpack("f", struct.pack("f", value))[0]  # per step on the host: no tensor round trip


def _acc(t: torch.Tensor):
    """fp32 math, except fp64 states (validation runs) stay fp64 end to end."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _launch(kernel, tuned, n, *args, **meta):
    """Autotuned launch (one call per new n tunes it: warm up before capturing a CUDA graph)."""
    if _INTERPRET:  # autotuning under the interpreter would only multiply the (slow) runs
        kernel[(triton.cdiv(n, _INTERPRET_BLOCK),)](*args, BLOCK=_INTERPRET_BLOCK, **meta)
    else:
        tuned[lambda cfg: (triton.cdiv(n, cfg["BLOCK"]),)](*args, **meta)


def _check_like(x, **others):
    for name, t in others.items():
        if t is not None and (t.shape != x.shape or t.device != x.device):
            raise ValueError(f"{name}: expected shape {tuple(x.shape)} on {x.device}, "
                             f"got {tuple(t.shape)} on {t.device}")


def _check_rng(x, rng_row):
    if rng_row.dtype != torch.int64 or rng_row.numel() != 2 or rng_row.device != x.device:
        raise ValueError(f"rng_row: expected an int64 (seed, k) tensor of 2 elements on {x.device}, "
                         f"got {rng_row.dtype} with {rng_row.numel()} elements on {rng_row.device}")


def em_step(x, score, guidance, rng_row, beta_dt: float, lam: float) -> torch.Tensor:
    """Fused x + beta_dt (x/2 + s + lam g) + sqrt(beta_dt) z(seed, k) (sde.euler_maruyama_step), launched.

    x: fp32 state (fp64 is computed in fp64) of any shape; score/guidance: x's shape, any float
    dtype; guidance may be None; rng_row: int64 (seed, k) on x's device.  Returns x's dtype.  The
    custom op coup_fast::em_step (coup_fast/ops.py, with its fake kernel and autograd) calls this.
    """
    if guidance is not None and lam == 0.0:
        guidance = None
    _check_like(x, score=score, guidance=guidance)
    _check_rng(x, rng_row)
    xc, sc, rc = x.contiguous(), score.contiguous(), rng_row.contiguous()
    gc = guidance.contiguous() if guidance is not None else xc  # dummy pointer, never read
    out = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _launch(_em_step_kernel, _em_step_tuned, n, xc, sc, gc, rc, out, n, *split(beta_dt), *split(math.sqrt(beta_dt)),
                *split(lam), HAS_GUIDANCE=guidance is not None, ACC=_acc(xc))
    return out


def philox_normal(like: torch.Tensor, rng_row: torch.Tensor) -> torch.Tensor:
    """z(seed, k) shaped like `like` (its dtype): element i from counter k * numel + i (noise.philox_normal)."""
    _check_rng(like, rng_row)
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    n = out.numel()
    if n:
        _launch(_philox_normal_kernel, _philox_normal_tuned, n, rng_row.contiguous(), out, n, ACC=_acc(out))
    return out

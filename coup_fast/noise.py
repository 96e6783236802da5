"""Replayable counter-based Gaussian noise (pure-torch reference of the fused kernels).

z_k[i] = normal(seed, k * numel + i): Philox4x32-10 on the 64-bit counter (lo, hi, 0, 0)
with the 64-bit seed as key, then Box-Muller on the first two 32-bit words.  The same
(seed, k) gives the same draw on the backward pass and on every CUDA-graph replay.
The C++ (csrc/coup_ops.cpp), CUDA (csrc/cuda/coup_ops.cu) and Triton
(coup_fast/kernels/em_step.py) versions implement exactly this recipe; tests compare them.

Recipe (all arithmetic mod 2^32):
    key = (seed & M, seed >> 32), ctr = (off & M, off >> 32, 0, 0)
    10 rounds: (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))
               k0 += 0x9E3779B9, k1 += 0xBB67AE85
    u1 = ((c0 >> 8) + 1) / 2^24 in (0, 1],  u2 = (c1 >> 8) / 2^24 in [0, 1)
    z = sqrt(-2 log u1) cos(2 pi u2)
"""
from __future__ import annotations

import math

import torch

PHILOX_A = 0xD2511F53
PHILOX_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
SEED_BOUND = 2**62  # seeds are drawn in [0, 2^62) so they stay positive int64


def _mul32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a constant a and b < 2^32 in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo  # < 2^48
    p_hi = b * a_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox_4x32(seed: int, offset: torch.Tensor):
    """First two output words of Philox4x32-10 for int64 counters `offset`."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = offset & _M32, (offset >> 32) & _M32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    for _ in range(PHILOX_ROUNDS):
        hi_a, lo_a = _mul32(PHILOX_A, c0)
        hi_b, lo_b = _mul32(PHILOX_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    return c0, c1


def philox_normal(seed: int, step: int, shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard-normal draws z_step of `shape`, element i from counter step * numel + i."""
    numel = math.prod(shape)
    offset = torch.arange(numel, dtype=torch.int64, device=device) + step * numel
    r0, r1 = philox_4x32(int(seed), offset)
    u1 = ((r0 >> 8) + 1).double() * 2.0**-24
    u2 = (r1 >> 8).double() * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).reshape(shape)


def diffusion_counter(n_steps: int) -> int:
    """The counter of DiffPure's forward-diffusion draw: after the N step draws k = 0 .. N-1 (docs/design.md §5)."""
    return n_steps


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from `generator` (or torch's global RNG, so torch.manual_seed reproduces runs)."""
    device = "cpu" if generator is None else generator.device  # a CUDA generator draws on its device
    return int(torch.randint(0, SEED_BOUND, (), generator=generator, device=device))


def rng_table(seed: int, n_steps: int, device) -> torch.Tensor:
    """(n_steps, 2) int64 device tensor of rows (seed, k): what the fused step reads.

    Kernels load seed and k from here instead of taking them as scalar arguments, so a
    captured CUDA graph draws new noise when a new seed is written into column 0.
    """
    table = torch.empty(n_steps, 2, dtype=torch.int64)
    table[:, 0] = seed
    table[:, 1] = torch.arange(n_steps)
    return table.to(device)

"""Subgradients at kinks, stated explicitly, so that a gradient does not depend on the torch version.

A clamp, a projection, a max or a min has no derivative on its kink, and autograd picks one; torch 2.14
changed `torch.clamp`'s pick (an input exactly on a bound got 1 up to 2.13, gets 0 since; a tensor bound
gets 0.5).  Image pixels sit exactly on 0 and 1, and attack iterates on the eps-ball's faces, all the time,
so every clamp that autograd differentiates in coup_fast goes through `clamp` here (docs/design.md §11):

    clamp(x, lo, hi) = lo where x < lo, hi where x > hi, x elsewhere
    d clamp / d x    = 1 on the closed interval lo <= x <= hi (the bounds included), 0 strictly outside
    d clamp / d lo   = 1 where x < lo (and d / d hi = 1 where x > hi), 0 on the bound itself

This is torch <= 2.13's inclusive pass-through: on a bound the input keeps its gradient, which is also the
one-sided derivative from inside the interval.  Written with `torch.where` on the comparisons, whose
backward routes each element's gradient to the branch it took, so no version's tie rule enters.  Values
are torch.clamp's bit for bit (NaN stays NaN).
"""
from __future__ import annotations

import torch


def clamp(x: torch.Tensor, lo=None, hi=None) -> torch.Tensor:
    """x clamped to [lo, hi] (either may be None: no bound), with the inclusive pass-through above.

    lo, hi: numbers or tensors broadcasting against x (a tensor bound receives the gradient of the elements
    it clamps).  Expects lo <= hi.
    """
    out = x
    if hi is not None:
        out = torch.where(x > hi, hi, out)
    if lo is not None:
        out = torch.where(x < lo, lo, out)
    return out

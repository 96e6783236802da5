"""coup_fast.kinks: the clamp whose derivative on a bound is stated (1, the inclusive pass-through), not left to
the torch version (torch 2.14 gives 0 there, and 0.5 to a tensor bound); its users: the pipeline's [0, 1] clamp.

References are independent of the code under test: torch.clamp for the values, and for the derivative the
closed form (1 on the closed interval, 0 strictly outside) and float64 one-sided finite differences taken from
inside the interval, which is what the inclusive convention equals on a bound."""
import torch

from coup_fast import kinks
from coup_fast.sde import ReverseGrid
from coup_fast.solver import NoiseStream, PurifyConfig, pipeline

F64 = torch.float64


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def test_values_are_torch_clamps_bit_for_bit():
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 1.0001, 7.0, float("nan"), float("inf"), -float("inf")])
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0), (None, 1.0), (-1.0, None)):
        got, want = kinks.clamp(x, lo, hi), torch.clamp(x, lo, hi)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    lo, hi = torch.full_like(x, -1.0), torch.linspace(0.0, 2.0, x.numel())
    got, want = kinks.clamp(x, lo, hi), torch.clamp(x, lo, hi)
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    for dtype in (torch.float32, F64):
        assert kinks.clamp(x.to(dtype), 0.0, 1.0).dtype == dtype


def test_derivative_on_the_bounds_is_one_and_equals_the_inward_one_sided_difference():
    x = torch.tensor([-2.0, -1.0, -0.25, 0.0, 1.0, 1.5], dtype=F64)
    lo, hi = -1.0, 1.0
    closed_form = ((x >= lo) & (x <= hi)).to(F64)  # 1 on [lo, hi], bounds included
    assert torch.equal(_grad(lambda v: kinks.clamp(v, lo, hi), x), closed_form)
    # one-sided differences of torch.clamp's values (no derivative involved), towards the inside on a bound
    h = 1e-6
    inward = torch.where(x >= hi, -1.0, 1.0).to(F64)
    fd = (torch.clamp(x + inward * h, lo, hi) - torch.clamp(x, lo, hi)) / (inward * h)
    torch.testing.assert_close(_grad(lambda v: kinks.clamp(v, lo, hi), x), fd, rtol=0, atol=1e-9)
    # one bound only: the same rule
    assert torch.equal(_grad(lambda v: kinks.clamp(v, lo=0.0), x), (x >= 0).to(F64))
    assert torch.equal(_grad(lambda v: kinks.clamp(v, hi=0.0), x), (x <= 0).to(F64))


def test_tensor_bounds_get_the_gradient_of_what_they_clamp_and_none_on_a_tie():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=F64, requires_grad=True)
    lo = torch.full((5,), -1.0, dtype=F64, requires_grad=True)
    hi = torch.full((5,), 1.0, dtype=F64, requires_grad=True)
    gx, glo, ghi = torch.autograd.grad(kinks.clamp(x, lo, hi).sum(), (x, lo, hi))
    assert torch.equal(gx, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0], dtype=F64))  # torch 2.14: 0.5 on the ties
    assert torch.equal(glo, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64))
    assert torch.equal(ghi, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=F64))


def test_pipeline_clamp_passes_the_gradient_of_pixels_exactly_on_0_and_1():
    """The pipeline's final clamp with a purified image exactly on 0 and 1 (the identity as the solve): the
    gradient to the images is 1 there (2 from u -> 2u - 1, 1/2 back), and 0 for a state pushed outside."""
    config = PurifyConfig(ReverseGrid.from_dt(0.01, 1e-3), 0.0, "reverse")
    u = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.25]], dtype=F64, requires_grad=True)
    push = torch.tensor([[0.0, 0.0, 0.0, -0.5, 0.5, 0.0]], dtype=F64)  # two pixels end outside the box
    out = pipeline(u, config, NoiseStream(u, config, torch.zeros(10, 1, 6, dtype=F64)), lambda state: state + push)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.25]], dtype=F64))
    (grad,) = torch.autograd.grad(out.sum(), u)
    assert torch.equal(grad, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]], dtype=F64))

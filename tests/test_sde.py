import math

import pytest
import torch

from coup_fast import sde


def test_alpha_sigma_match_integral_of_beta():
    # alpha(t) = exp(-1/2 int_0^t beta), checked by quadrature, and alpha^2 + sigma^2 = 1.
    for t in (1e-3, 0.075, 0.1, 0.5, 1.0):
        s = torch.linspace(0, t, 20001, dtype=torch.float64)
        integral = torch.trapezoid(sde.vp_beta(s), s).item()
        assert sde.vp_alpha(t) == pytest.approx(math.exp(-0.5 * integral), rel=1e-9)
        assert sde.vp_alpha(t) ** 2 + sde.vp_sigma(t) ** 2 == pytest.approx(1.0, abs=1e-12)
        assert sde.vp_gamma(t) == pytest.approx(0.5 * integral, rel=1e-9)
    t = torch.tensor([0.01, 0.3], dtype=torch.float64)
    assert torch.allclose(sde.vp_sigma(t), torch.tensor([sde.vp_sigma(0.01), sde.vp_sigma(0.3)], dtype=torch.float64))


@pytest.mark.parametrize("t_star,dt,n", [(0.1, 1e-3, 100), (0.075, 1e-3, 75), (0.1, 0.03, 3)])
def test_reverse_grid(t_star, dt, n):
    grid = sde.ReverseGrid.from_dt(t_star, dt)
    assert grid.n_steps == n
    assert grid.t(0) == t_star and grid.t(n) == pytest.approx(0.0, abs=1e-15)
    assert grid.beta_dt(1) == pytest.approx((0.1 + grid.t(1) * 19.9) * t_star / n)


def test_euler_maruyama_step_formula():
    x, s, g, z = (torch.tensor([v]) for v in (0.3, -1.2, 0.7, 0.5))
    bdt, lam = 0.02, 2.0
    expected = 0.3 + bdt * (0.15 - 1.2 + 1.4) + math.sqrt(bdt) * 0.5
    assert sde.euler_maruyama_step(x, s, g, bdt, lam, z).item() == pytest.approx(expected, rel=1e-6)
    assert sde.euler_maruyama_step(x, s, None, bdt, lam, None).item() == pytest.approx(0.3 + bdt * (0.15 - 1.2), rel=1e-6)
    assert sde.adjoint_step(x, s, bdt).item() == pytest.approx(0.3 + bdt * (0.15 - 1.2), rel=1e-6)


def test_diffuse_matches_the_vp_marginal():
    x0 = torch.full((200_000,), 0.4, dtype=torch.float64)
    eps = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xt = sde.diffuse(x0, 0.3, eps, "vp")
    assert xt.mean().item() == pytest.approx(0.4 * sde.vp_alpha(0.3), abs=5 * sde.vp_sigma(0.3) / 447)
    assert xt.std().item() == pytest.approx(sde.vp_sigma(0.3), rel=0.01)


def test_ddpm_schedule_is_diffpures_discrete_one():
    # DiffPure: betas = linspace(0.1/1000, 20/1000, 1000), a = cumprod(1 - betas), x = x0 sqrt(a[t-1]) + e sqrt(1 - a[t-1])
    # with t = 1000 t*; written out with numpy, independently of sde.py
    np = pytest.importorskip("numpy")
    a = np.cumprod(1.0 - np.linspace(0.1 / 1000, 20 / 1000, 1000))
    for t_star in (0.1, 0.075, 0.001, 1.0):
        scale, std = sde.diffusion_marginal(t_star, "ddpm")
        k = round(1000 * t_star) - 1
        assert scale == pytest.approx(math.sqrt(a[k]), rel=1e-12) and std == pytest.approx(math.sqrt(1 - a[k]), rel=1e-12)
    assert sde.diffusion_marginal(0.1, "ddpm") == pytest.approx((0.947110, 0.320908), abs=1e-6)
    assert sde.diffusion_marginal(0.1, "vp") == pytest.approx((0.946722, 0.322053), abs=1e-6)
    x0, eps = torch.tensor([0.5]), torch.tensor([-1.0])
    assert sde.diffuse(x0, 0.1, eps).item() == pytest.approx(0.5 * math.sqrt(a[99]) - math.sqrt(1 - a[99]), rel=1e-6)
    with pytest.raises(ValueError, match="^t_star:"):
        sde.ddpm_index(0.0333)

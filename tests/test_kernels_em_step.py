"""coup_fast.kernels.em_step (fused step + in-kernel Philox) against sde.py / noise.py.

Without a GPU the kernels run under the Triton interpreter on CPU tensors: tests/conftest.py
sets TRITON_INTERPRET=1 for the whole session before triton is first imported.
"""
import pytest
import torch

from coup_fast import noise, sde
from problems import KERNEL_DEVICE as DEVICE, needs_triton_runtime as here

SEED = 123456789012345


def _kernels():
    pytest.importorskip("triton")
    from coup_fast.kernels import em_step

    return em_step


def _rng(seed, k):
    return torch.tensor([seed, k], dtype=torch.int64, device=DEVICE)


@here
@pytest.mark.parametrize("shape", [(3, 1, 7, 5), (2, 4100), (1,)])
@pytest.mark.parametrize("k", [0, 7, 50_000_000])  # the last one puts counters past 2^32 (high word)
def test_philox_normal_matches_recipe(shape, k):
    z = _kernels().philox_normal(torch.empty(shape, device=DEVICE), _rng(SEED, k))
    ref = noise.philox_normal(SEED, k, shape, dtype=torch.float64)
    assert z.dtype == torch.float32 and z.shape == shape
    torch.testing.assert_close(z.double().cpu(), ref, rtol=0, atol=5e-6)


@here
@pytest.mark.parametrize("with_guidance", [True, False])
@pytest.mark.parametrize("shape", [(3, 1, 7, 5), (5, 13)])
def test_em_step_forward(shape, with_guidance):
    g = torch.Generator().manual_seed(0)
    x, s, gd = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(3))
    gd = gd if with_guidance else None
    out = _kernels().em_step(x, s, gd, _rng(SEED, 3), 0.0213, 1.7)
    z = noise.philox_normal(SEED, 3, shape, device=DEVICE)
    ref = sde.euler_maruyama_step(x, s, gd, 0.0213, 1.7, z)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@here
def test_em_step_half_precision_inputs():
    """fp32 state, fp16 score/guidance (bf16 on a GPU): upcast on load, fp32 result."""
    low = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter (numpy) has no bf16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 33, generator=g).to(DEVICE)
    s, gd = (torch.randn(4, 33, generator=g).to(DEVICE, low) for _ in range(2))
    out = _kernels().em_step(x, s, gd, _rng(SEED, 0), 0.02, 0.5)
    z = noise.philox_normal(SEED, 0, x.shape, device=DEVICE)
    ref = sde.euler_maruyama_step(x, s.float(), gd.float(), 0.02, 0.5, z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@here
def test_noise_statistics_and_replay():
    k_mod = _kernels()
    like = torch.empty(1 << 16, device=DEVICE)
    z0, z1 = k_mod.philox_normal(like, _rng(SEED, 0)), k_mod.philox_normal(like, _rng(SEED, 1))
    n = like.numel()
    assert abs(z0.mean().item()) < 5 / n**0.5 and abs(z0.var().item() - 1) < 0.03
    corr = torch.corrcoef(torch.stack([z0, z1]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5  # steps k and k + 1 use disjoint counters: independent draws
    torch.testing.assert_close(k_mod.philox_normal(like, _rng(SEED, 0)), z0, rtol=0, atol=0)
    assert not torch.equal(k_mod.philox_normal(like, _rng(SEED + 1, 0)), z0)


@here
def test_seed_is_read_from_memory():
    """Writing a new seed into the rng row changes the draw (what a captured CUDA graph relies on)."""
    k_mod = _kernels()
    x = torch.zeros(64, device=DEVICE)
    s = torch.zeros_like(x)
    rng = _rng(1, 0)
    first = k_mod.em_step(x, s, None, rng, 0.04, 0.0)
    rng[0] = 2
    second = k_mod.em_step(x, s, None, rng, 0.04, 0.0)
    torch.testing.assert_close(second, 0.2 * noise.philox_normal(2, 0, x.shape, device=DEVICE), rtol=0, atol=1e-6)
    assert not torch.allclose(first, second)


def _on_triton():
    """coup_fast.ops (the registered ops, their autograd and fakes) running these kernels on DEVICE."""
    from coup_fast import ops

    return ops.force_backend(torch.device(DEVICE).type, "triton")


@here
@pytest.mark.parametrize("with_guidance", [True, False])
def test_em_step_gradients(with_guidance):
    from coup_fast import ops

    _kernels()
    g = torch.Generator().manual_seed(2)
    x, s, gd = (torch.randn(3, 11, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    gd_in = gd if with_guidance else None
    upstream = torch.randn(3, 11, generator=g).to(DEVICE)
    with _on_triton():
        out = ops.em_step(x, s, gd_in, _rng(SEED, 5), 0.03, 2.0)
    z = noise.philox_normal(SEED, 5, x.shape, device=DEVICE)
    ref = sde.euler_maruyama_step(x, s, gd_in, 0.03, 2.0, z)
    inputs = (x, s, gd) if with_guidance else (x, s)
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(ref, inputs, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@here
def test_opcheck():
    _kernels()  # triton importable
    x = torch.randn(2, 9, device=DEVICE)
    args = (x, torch.randn_like(x), torch.randn_like(x), _rng(SEED, 1), 0.02, 1.0)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    with _on_triton():
        torch.library.opcheck(torch.ops.coup_fast.em_step.default, args, test_utils=utils)
        torch.library.opcheck(torch.ops.coup_fast.philox_normal.default, (x, _rng(SEED, 1)),
                              test_utils=("test_schema", "test_faketensor"))


@here
def test_bad_rng_row_is_rejected():
    x = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="rng_row"):
        _kernels().em_step(x, x, None, torch.tensor([1.0, 2.0], device=DEVICE), 0.01, 0.0)


@here
def test_float64_states_are_computed_in_float64():
    k_mod = _kernels()
    g = torch.Generator().manual_seed(3)
    x, s, gd = (torch.randn(3, 50, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    z = noise.philox_normal(SEED, 9, x.shape, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(k_mod.philox_normal(x, _rng(SEED, 9)), z, rtol=0, atol=1e-12)
    out = k_mod.em_step(x, s, gd, _rng(SEED, 9), 0.0213, 1.7)
    torch.testing.assert_close(out, sde.euler_maruyama_step(x, s, gd, 0.0213, 1.7, z), rtol=0, atol=1e-12)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjoint_update(dtype):
    pytest.importorskip("triton")
    from coup_fast import ops

    g = torch.Generator().manual_seed(4)
    a, v = (torch.randn(5, 131, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for _ in range(2))
    with _on_triton():
        out = ops.adjoint_update(a, v, 0.019)
    ref = sde.adjoint_step(a, v, 0.019)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, ref, **tol)
    upstream = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (a, v), upstream), torch.autograd.grad(ref, (a, v), upstream)):
        torch.testing.assert_close(got, want, **tol)
    with _on_triton():
        torch.library.opcheck(torch.ops.coup_fast.adjoint_update.default, (a, v, 0.019),
                              test_utils=("test_schema", "test_faketensor"))


@here
def test_purify_through_the_triton_backend(monkeypatch):
    """ops.* routed to these kernels: purify and its exact gradient match the C++/torch path."""
    pytest.importorskip("triton")
    from coup_fast import ops, purify
    from problems import analytic_problem

    score, clf = analytic_problem(d=6)
    score, clf = score.to(DEVICE), clf.to(DEVICE)
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run():
        xr = x.clone().requires_grad_(True)
        # eager: the torch backend reads (seed, k) on the host, which a CUDA graph cannot capture
        out = purify(xr, score, clf, t_star=0.01, lam=2.0, generator=torch.Generator().manual_seed(2), engine="eager")
        return out.detach(), torch.autograd.grad(out, xr, w)[0]

    with ops.force_backend(torch.device(DEVICE).type, "torch"):
        want = run()
    with _on_triton():
        got = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

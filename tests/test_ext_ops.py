"""The C++/CUDA extension's kernels (torch.ops.coup_fast_ext.*) against their pure-torch twins, and the ops
coup_fast registers over them (torch.ops.coup_fast.*: fake kernels, autograd) on the extension backend + opcheck."""
import pytest
import torch

from coup_fast import extension, noise, ops, sde

pytestmark = pytest.mark.skipif(not extension.load_extension(),
                                reason=f"extension not built: {extension.extension_status()['error']}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SEED = 987654321987
# CPU and CUDA ops compute in at::opmath_type: float for float32 tensors, double for float64.
TOL = {torch.float32: dict(rtol=1e-6, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _rng(k, device, seed=SEED):
    return torch.tensor([seed, k], dtype=torch.int64, device=device)


def _states(shape, dtype, device, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).to(device) for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0, 11, 50_000_000])  # the last one uses the counter's high word
def test_philox_normal(device, dtype, k):
    shape = (3, 1, 7, 5)
    z = torch.ops.coup_fast_ext.philox_normal(torch.empty(shape, dtype=dtype, device=device), _rng(k, device))
    want = noise.philox_normal(SEED, k, shape, dtype=dtype, device=device)
    torch.testing.assert_close(z, want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_guidance", [True, False])
def test_em_step(device, dtype, with_guidance):
    x, s, g = _states((2, 3, 5, 4), dtype, device)
    g = g if with_guidance else None
    out = torch.ops.coup_fast_ext.em_step(x, s, g, _rng(4, device), 0.0217, 1.3)
    z = noise.philox_normal(SEED, 4, x.shape, dtype=dtype, device=device)
    torch.testing.assert_close(out, sde.euler_maruyama_step(x, s, g, 0.0217, 1.3, z), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjoint_update(device, dtype):
    a, v = _states((4, 37), dtype, device, n=2)
    out = torch.ops.coup_fast_ext.adjoint_update(a, v, 0.019)
    torch.testing.assert_close(out, sde.adjoint_step(a, v, 0.019), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_linear_ops(device):
    x, s, g = (t.requires_grad_() for t in _states((3, 8), torch.float64, device))
    upstream = torch.randn(3, 8, dtype=torch.float64, device=device)
    out = torch.ops.coup_fast.em_step(x, s, g, _rng(2, device), 0.03, 0.7)
    ref = sde.euler_maruyama_step(x, s, g, 0.03, 0.7, noise.philox_normal(SEED, 2, x.shape, dtype=torch.float64,
                                                                           device=device))
    for a, b in zip(torch.autograd.grad(out, (x, s, g), upstream), torch.autograd.grad(ref, (x, s, g), upstream)):
        torch.testing.assert_close(a, b)
    a, v = (t.requires_grad_() for t in _states((3, 8), torch.float64, device, n=2, seed=1))
    assert torch.autograd.gradcheck(lambda a, v: torch.ops.coup_fast.adjoint_update(a, v, 0.05), (a, v))


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    x, s, _ = _states((6, 10), torch.float32, device)
    xt, st = x.t(), s.t()  # (10, 6) views, not contiguous
    out = torch.ops.coup_fast_ext.em_step(xt, st, None, _rng(1, device), 0.02, 0.0)
    z = noise.philox_normal(SEED, 1, xt.shape, device=device)
    torch.testing.assert_close(out, sde.euler_maruyama_step(xt, st, None, 0.02, 0.0, z), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, s, g = (t.requires_grad_() for t in _states((2, 9), torch.float32, device))
    rng = _rng(3, device)
    for args in [(x, s, g, rng, 0.02, 1.0), (x, s, None, rng, 0.02, 0.0)]:
        torch.library.opcheck(torch.ops.coup_fast.em_step.default, args)
    torch.library.opcheck(torch.ops.coup_fast.philox_normal.default, (x.detach(), rng))
    torch.library.opcheck(torch.ops.coup_fast.adjoint_update.default, (x, s, 0.02))
    for args in [(x, s, g, rng, 0.02, 1.0), (x, s, None, rng, 0.02, 0.0)]:  # the raw kernels' schemas
        torch.library.opcheck(torch.ops.coup_fast_ext.em_step.default, args, test_utils=("test_schema",))


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    x = torch.zeros(2, 3, device=device)
    with pytest.raises(RuntimeError, match="score"):
        torch.ops.coup_fast_ext.em_step(x, torch.zeros(3, 2, device=device), None, _rng(0, device), 0.01, 0.0)
    with pytest.raises(RuntimeError, match="rng"):
        torch.ops.coup_fast_ext.philox_normal(x, torch.zeros(2, device=device))


def test_adjoint_update_dispatch(monkeypatch):
    # the backward pass's op: the extension's CUDA kernel on CUDA when it is built, else the device's backend
    def adjoint_backend(device):
        ops.clear_backend_choice()  # what the fakes below make it choose is not kept
        return ops.backend(device, "adjoint_update")

    assert adjoint_backend("cpu") == ops.backend("cpu")
    monkeypatch.setattr(extension, "load_extension", lambda: True)
    monkeypatch.setattr(extension, "extension_status", lambda: {"cuda": True})
    assert adjoint_backend("cuda") == "cuda-ext"
    monkeypatch.setattr(extension, "extension_status", lambda: {"cuda": False})
    assert adjoint_backend("cuda") == ops.backend("cuda")
    ops.clear_backend_choice()

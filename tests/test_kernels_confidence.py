"""coup_fast.kernels.confidence (fused log max softmax, twice differentiable) vs guidance.log_max_softmax.

Without a GPU the kernels run under the Triton interpreter on CPU tensors: tests/conftest.py
sets TRITON_INTERPRET=1 for the whole session before triton is first imported.
"""
import pytest
import torch

from coup_fast.analytic import LinearSoftmaxClassifier
from coup_fast.guidance import confidence_grad, log_max_softmax
from problems import KERNEL_DEVICE as DEVICE, needs_triton_runtime as here

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _fused():
    pytest.importorskip("triton")
    from coup_fast.kernels.confidence import log_max_softmax as fused

    return fused


def _value_grad_hvp(fn, logits, u, w):
    """c(l), d<u, c>/dl and d<w, d<u, c>/dl>/dl (the double backward the exact adjoint uses)."""
    logits = logits.detach().requires_grad_(True)
    conf = fn(logits)
    (grad,) = torch.autograd.grad((conf * u).sum(), logits, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * w).sum(), logits)
    return conf, grad, hvp


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes", [(3, 7), (3, 10), (3, 1000), (2, 1), (5, 3)])
def test_forward_grad_double_backward(batch, classes, dtype):
    g = torch.Generator().manual_seed(classes)
    logits = (3 * torch.randn(batch, classes, generator=g, dtype=dtype)).to(DEVICE)
    u = torch.randn(batch, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(batch, classes, generator=g, dtype=dtype).to(DEVICE)
    got = _value_grad_hvp(_fused(), logits, u, w)
    want = _value_grad_hvp(log_max_softmax, logits, u, w)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


@here
def test_gradcheck_and_gradgradcheck():
    logits = torch.randn(3, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(_fused(), (logits,))
    assert torch.autograd.gradgradcheck(_fused(), (logits,))


@here
def test_ties_pick_the_first_maximum_and_large_logits_stay_finite():
    logits = torch.tensor([[1.0, 1.0, 0.0], [2e4, -1e4, 2e4 - 1]], device=DEVICE)
    u = torch.ones(2, device=DEVICE)
    w = torch.ones(2, 3, device=DEVICE)
    got = _value_grad_hvp(_fused(), logits, u, w)
    # The twin in float64: torch's fp32 logsumexp rounds m + log(...) at 2e4 to ~1e-3, the fused
    # -log(sum exp(l - m)) does not.
    want = _value_grad_hvp(log_max_softmax, logits.double(), u.double(), w.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@here
def test_hessian_vector_product_through_a_classifier():
    """confidence_grad(create_graph=True) + autograd = H v, H in closed form for a linear classifier."""
    g = torch.Generator().manual_seed(3)
    clf = LinearSoftmaxClassifier(3 * torch.randn(6, 8, generator=g, dtype=torch.float64)).to(DEVICE)
    x = (torch.rand(4, 8, generator=g, dtype=torch.float64) * 2 - 1).to(DEVICE).requires_grad_(True)
    v = torch.randn(4, 8, generator=g, dtype=torch.float64).to(DEVICE)
    grad = confidence_grad(clf, x, create_graph=True, log_confidence=_fused())
    torch.testing.assert_close(grad, clf.confidence_grad(x), rtol=1e-10, atol=1e-12)
    (hvp,) = torch.autograd.grad((grad * v).sum(), x)
    want = (clf.confidence_hessian(x.detach()) @ v[:, :, None]).squeeze(-1)
    torch.testing.assert_close(hvp, want, rtol=1e-10, atol=1e-12)


@here
def test_opcheck():
    from coup_fast.kernels import confidence

    logits = torch.randn(3, 10, device=DEVICE, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(confidence._confidence, (logits,), test_utils=utils)
    torch.library.opcheck(confidence._confidence_backward, (logits, torch.randn(3, device=DEVICE)), test_utils=utils)


@here
def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="logits"):
        _fused()(torch.zeros(3, device=DEVICE))

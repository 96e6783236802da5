"""engine='compile' (coup_fast.engines.compiled: torch.compile'd torch.func step functions) against the
unrolled autograd reference, in float64 on the tiny neural models.

Each compiled function costs seconds to build on a CPU, so the tests share one problem (same
shapes, dtype, lam) and the compile engine's cache of compiled networks.
"""
import pytest
import torch

from coup_fast import purify
from coup_fast.engines.compiled import ENGINE as COMPILE_ENGINE
from coup_fast.reference import purify_unrolled
from problems import neural_problem, out_and_grad, step_noise

F64 = torch.float64
T_STAR, DT, LAM = 0.015, 0.005, 2.0  # 3 steps


@pytest.fixture(scope="module")
def problem():
    score, clf = neural_problem(dtype=F64)
    x = 0.2 + 0.6 * torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    return score, clf, x, upstream


def _noise(mode, shape):
    return step_noise(round(T_STAR / DT) + (mode == "diffpure"), shape, seed=3)


@pytest.mark.parametrize("mode,gradient,memory", [("coup", "exact", "lean"), ("coup", "exact", "fast"),
                                                  ("coup", "exact", "auto"), ("coup", "exact", "one-step"),
                                                  ("coup", "detached-guidance", "lean"),
                                                  ("coup", "detached-guidance", "fast"), ("reverse", "exact", "lean")])
def test_compiled_engine_equals_unrolled_autograd(problem, mode, gradient, memory):
    score, clf, x, upstream = problem
    if memory == "one-step":  # a budget that keeps the first of the 3 step graphs, recomputes the others
        from coup_fast.adjoint import KeptStep

        step = KeptStep.record_exact(2 * x - 1, T_STAR, COMPILE_ENGINE.networks(score, clf), LAM, True).graph_bytes()
        memory = 2 * step + 3 * x.numel() * x.element_size()
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, mode=mode, noise=_noise(mode, x.shape), gradient=gradient)
    out, grad = out_and_grad(lambda v: purify(v, score, clf, engine="compile", memory=memory, **kw), x, upstream)
    ref_out, ref_grad = out_and_grad(lambda v: purify_unrolled(v, score, clf, **kw), x, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-8


@pytest.mark.parametrize("memory", ["lean", "fast"])
def test_compiled_engine_new_batch_size_is_exact(problem, memory):
    """An attack's ragged last batch: a second batch size after the first.  With symbolic sizes,
    torch 2.11 and 2.12 could not trace the Hessian products (engines.compiled._compile)."""
    score, clf, x, upstream = problem
    for batch in (3, 1):  # the module's other tests use batch 2
        xb = torch.cat([x, 1 - x])[:batch]
        up = torch.cat([upstream, -upstream])[:batch]
        kw = dict(t_star=T_STAR, dt=DT, lam=LAM, noise=_noise("coup", xb.shape))
        out, grad = out_and_grad(lambda v: purify(v, score, clf, engine="compile", memory=memory, **kw), xb, up)
        ref_out, ref_grad = out_and_grad(lambda v: purify_unrolled(v, score, clf, **kw), xb, up)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-8


def test_compiled_engine_seeded_noise_matches_eager_and_reuses_compilation(problem):
    score, clf, x, upstream = problem
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM)
    runs = [out_and_grad(lambda v: purify(v, score, clf, generator=torch.Generator().manual_seed(5), engine=e, **kw),
                      x, upstream) for e in ("eager", "compile")]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-9, atol=1e-12)
    assert COMPILE_ENGINE.networks(score, clf) is COMPILE_ENGINE.networks(score, clf)


def test_compiled_engine_follows_in_place_weight_changes(problem):
    score, clf, x, _ = problem
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, noise=_noise("coup", x.shape))
    before = purify(x, score, clf, engine="compile", **kw)
    saved = clf.fc.weight.clone()
    try:
        clf.fc.weight.mul_(3.0)  # what an optimiser step does between attack or training iterations
        after = purify(x, score, clf, engine="compile", **kw)
        torch.testing.assert_close(after, purify_unrolled(x, score, clf, **kw), rtol=1e-12, atol=1e-12)
        assert (after - before).abs().max() > 1e-6
    finally:
        clf.fc.weight.copy_(saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor's Triton code path)")
@pytest.mark.parametrize("memory", ["lean", "fast"])
def test_compiled_engine_on_cuda_matches_eager(memory):
    """Two batch sizes, as an attack's ragged last batch: with symbolic sizes torch 2.11's inductor could
    not compile the Hessian products' convolution double backward on CUDA."""
    score, clf = neural_problem(dtype=torch.float32)
    score, clf = score.cuda(), clf.cuda()
    kw = dict(t_star=T_STAR, dt=DT, lam=LAM, memory=memory)
    for batch in (4, 3):
        x = 0.2 + 0.6 * torch.rand(batch, 1, 4, 4, generator=torch.Generator().manual_seed(7)).cuda()
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).cuda()
        runs = [out_and_grad(lambda v: purify(v, score, clf, generator=torch.Generator().manual_seed(5), engine=e,
                                              **kw), x, upstream) for e in ("eager", "compile")]
        torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
        assert ((runs[1][1] - runs[0][1]).norm() / runs[0][1].norm()).item() <= 1e-4


def test_compiled_engine_new_lam_is_exact_without_recompiling(problem):
    """lam enters the compiled VJP as a tensor: a lam sweep compiles once and stays exact."""
    from torch._dynamo.utils import counters

    score, clf, x, upstream = problem
    kw = dict(t_star=T_STAR, dt=DT, noise=_noise("coup", x.shape))
    out_and_grad(lambda v: purify(v, score, clf, lam=LAM, engine="compile", **kw), x, upstream)
    graphs_before = counters["stats"]["unique_graphs"]
    out, grad = out_and_grad(lambda v: purify(v, score, clf, lam=0.7, engine="compile", **kw), x, upstream)
    ref_out, ref_grad = out_and_grad(lambda v: purify_unrolled(v, score, clf, lam=0.7, **kw), x, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-8
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_compiled_engine_rejects_logits_of_another_shape(problem):
    score, clf, x, _ = problem
    flat = lambda u: clf(u)[:, 0]  # noqa: E731  (B,) logits: the max would run over the batch
    with pytest.raises(ValueError, match=r"^classifier: expected logits of shape \(B, C\)"):
        purify(x, score, flat, t_star=T_STAR, dt=DT, lam=LAM, engine="compile")


class _Swish(torch.autograd.Function):
    """x sigmoid(x) as a custom Function, as RobustBench's DeepMind WRNs write their activation."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))


class _FunctionClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(16, 8, generator=g, dtype=F64), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(8, 5, generator=g, dtype=F64), requires_grad=False)

    def forward(self, u):
        return _Swish.apply(u.flatten(1) @ self.w1) @ self.w2


@pytest.mark.parametrize("memory", ["lean", "fast"])
def test_compiled_engine_falls_back_where_compile_drops_the_hessian(problem, memory):
    # torch.compile returns a zero second derivative through the custom Function: the engine must
    # notice on its first Hessian-vector product, warn, and still give the exact gradient
    score, _, x, upstream = problem
    clf = _FunctionClassifier()
    kw = dict(t_star=T_STAR, dt=DT, lam=20.0, noise=_noise("coup", x.shape))
    with pytest.warns(UserWarning, match="Hessian-vector product disagrees"):
        out, grad = out_and_grad(lambda v: purify(v, score, clf, engine="compile", memory=memory, **kw), x, upstream)
    ref_out, ref_grad = out_and_grad(lambda v: purify_unrolled(v, score, clf, **kw), x, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-8


def test_choose_engine_compiles_only_where_it_pays(monkeypatch):
    from coup_fast import engines

    assert engines.choose_engine("cuda", 10_000).engine == "auto"  # CUDA graphs, bitwise eager
    monkeypatch.setattr(engines.shutil, "which", lambda name: "/usr/bin/" + name)
    few, many = engines.choose_engine("cpu", 10), engines.choose_engine("cpu", engines.COMPILE_MIN_CALLS)
    assert (few.engine, few.compiles) == ("eager", False) and (many.engine, many.compiles) == ("compile", True)
    assert "compiling" in many.reason
    # with a measured call time: compile when the calls' saving beats the compile time
    assert engines.choose_engine("cpu", 100, seconds_per_call=10.0).engine == "compile"
    assert engines.choose_engine("cpu", 100, seconds_per_call=0.01).engine == "eager"
    monkeypatch.setattr(engines.shutil, "which", lambda name: None)
    assert engines.choose_engine("cpu", 10**6).engine == "eager"  # no C++ compiler for inductor
    for choice in (few, many):
        assert choice.engine in engines.CHOICES


def test_network_rounding_of_the_precision_knobs():
    from coup_fast.precision import Precision, network_rounding, prepare

    score, clf = neural_problem(dtype=torch.float32)
    assert network_rounding(score, clf) == 0.0
    assert network_rounding(prepare(score, Precision("bf16")), clf) == 2.0**-8
    assert network_rounding(prepare(score, Precision("tf32")), prepare(clf, Precision(channels_last=True))) == 2.0**-11

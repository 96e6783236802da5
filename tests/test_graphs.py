"""coup_fast.engines.graph: engine selection, cache keys and LRU, seeds, fallback, and (on CUDA) the real capture.

On the CPU the graph engine runs with `eager_capture`, which keeps the static-buffer contract of
a CUDA graph (replay refreshes the first call's outputs in place), so everything but the recording
itself is exercised: seed writes, trajectory bookkeeping, the autograd wrapper, the LRU.
"""
import warnings

import pytest
import torch

from coup_fast import clear_caches, purify
from coup_fast.engines import graph as graphs
from coup_fast.noise import draw_seed
from coup_fast.precision import Precision, backend_flags, precision_context, prepare
from coup_fast.purify import validate
from coup_fast.solver import NoiseStream, pipeline
from problems import neural_problem

ENGINE = graphs.ENGINE  # the engine purify(engine='graph') uses

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device; none on this machine")
KW = dict(t_star=0.005, lam=1.0, dt=1e-3)  # 5 steps


def _setting(x, score, clf, mode="coup", gradient="exact", **kw):
    kw = {**KW, **kw}
    return validate(x, score, clf, gradient=gradient, noise=None, mode=mode, **kw)


def _images(batch=3, device="cpu", seed=0):
    return torch.rand(batch, 1, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device)


def purify_graph(x, score, clf, setting, generator=None, gradient="exact", cache=None):
    """purify (validated into `setting`) through a graph engine over `cache` (a CPU stand-in capture)."""
    engine = graphs.GraphEngine(cache)
    stream = NoiseStream(x, setting, generator=generator)
    return pipeline(x, setting, stream, lambda s: engine.solve(s, score, clf, setting, stream, gradient), gradient)


def _graph(x, score, clf, cache, seed=5, mode="coup", gradient="exact"):
    setting = _setting(x, score, clf, mode, gradient)
    return purify_graph(x, score, clf, setting, torch.Generator().manual_seed(seed), gradient, cache=cache)


def _eager(x, score, clf, seed=5, mode="coup", gradient="exact"):
    return purify(x, score, clf, generator=torch.Generator().manual_seed(seed), mode=mode, gradient=gradient,
                  engine="eager", **KW)


# --------------------------------------------------------------------------- engine argument
@pytest.mark.parametrize("engine", ["fast", "", None, 1, "GRAPH"])
def test_engine_is_validated(engine):
    score, clf = neural_problem()
    with pytest.raises(ValueError, match=r"engine: expected one of \('auto', 'eager', 'graph', 'compile', 'torchsde'\)"):
        purify(_images(), score, clf, engine=engine, **KW)


def test_auto_on_cpu_is_the_eager_engine():
    score, clf = neural_problem()
    x = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = purify(x, score, clf, generator=torch.Generator().manual_seed(3), engine="auto", **KW)
    assert torch.equal(auto, _eager(x, score, clf, seed=3))


def test_graph_on_cpu_warns_once_and_runs_eager():
    score, clf = neural_problem()
    x = _images()
    clear_caches()
    with pytest.warns(RuntimeWarning, match="engine='graph' runs the eager engine instead: x is on cpu"):
        out = purify(x, score, clf, generator=torch.Generator().manual_seed(3), engine="graph", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time
        purify(x, score, clf, engine="graph", **KW)
    assert torch.equal(out, _eager(x, score, clf, seed=3))


def test_unsupported_reasons():
    x = _images()
    assert "cpu" in ENGINE.unsupported(x)
    meta = torch.empty(2, 3, device="meta")
    assert ENGINE.unsupported(meta) is not None


# --------------------------------------------------------------------------- the engine on the CPU stand-in
@pytest.mark.parametrize("mode", ["coup", "reverse", "diffpure"])
@pytest.mark.parametrize("gradient", ["exact", "detached-guidance", "bpda"])
def test_graph_engine_matches_eager_bitwise(mode, gradient):
    score, clf = neural_problem()
    cache = graphs.GraphCache(capture=graphs.eager_capture)
    x = _images()
    v = torch.randn_like(x)
    xg, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_g = _graph(xg, score, clf, cache, mode=mode, gradient=gradient)
    out_e = _eager(xe, score, clf, mode=mode, gradient=gradient)
    assert torch.equal(out_g, out_e)
    (grad_g,) = torch.autograd.grad(out_g, xg, v)
    (grad_e,) = torch.autograd.grad(out_e, xe, v)
    assert torch.equal(grad_g, grad_e)
    with torch.no_grad():  # the forward-only graph too
        assert torch.equal(_graph(x, score, clf, cache, mode=mode, gradient=gradient),
                           _eager(x, score, clf, mode=mode, gradient=gradient))


def test_each_call_writes_a_fresh_seed():
    score, clf = neural_problem()
    cache = graphs.GraphCache(capture=graphs.eager_capture)
    x = _images()
    setting = _setting(x, score, clf)
    gen, twin = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    outs = []
    for _ in range(3):
        outs.append(purify_graph(x, score, clf, setting, gen, cache=cache))
        (entry,) = [cache.get(k, None) for k in cache.keys()]
        seed = draw_seed(twin)
        assert entry.table[:, 0].eq(seed).all()  # the seed column, rewritten in place
        assert torch.equal(entry.table[:, 1], torch.arange(setting.grid.n_steps + 1))
    assert len(cache) == 1  # no rebuild
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_eot_samples_are_independent_and_their_gradients_exact():
    """K forwards of one configuration, one backward of the sum: each sample keeps its own noise,
    and the trajectories overwritten by later replays are recomputed from (input, seed)."""
    score, clf = neural_problem()
    cache = graphs.GraphCache(capture=graphs.eager_capture)
    x = _images()
    v = torch.randn_like(x)
    gen, twin = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    xg, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    setting = _setting(x, score, clf)
    samples = [purify_graph(xg, score, clf, setting, gen, cache=cache) for _ in range(3)]
    twins = [purify(xe, score, clf, generator=twin, engine="eager", **KW) for _ in range(3)]
    assert not torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    for s, t in zip(samples, twins):
        assert torch.equal(s, t)
    (grad_g,) = torch.autograd.grad(sum((s * v).sum() for s in samples), xg)
    (grad_e,) = torch.autograd.grad(sum((t * v).sum() for t in twins), xe)
    assert torch.equal(grad_g, grad_e)


def test_backward_after_another_graph_replays_recomputes_the_trajectory():
    score, clf = neural_problem()
    cache = graphs.GraphCache(capture=graphs.eager_capture)
    xa, xb = _images(3, seed=0), _images(2, seed=1)
    va = torch.randn_like(xa)
    xa = xa.requires_grad_(True)
    out_a = _graph(xa, score, clf, cache, seed=1)
    key_a = cache.keys()[0]
    with torch.no_grad():
        _graph(xb, score, clf, cache, seed=2)  # another configuration replays in between
    entry = cache.get(key_a, None)
    assert entry.owner is not None and not entry.holds(entry.owner)
    (grad,) = torch.autograd.grad(out_a, xa, va)
    xe = xa.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_eager(xe, score, clf, seed=1), xe, va)
    assert torch.equal(grad, expected)


def test_pgd_iteration_is_two_replays():
    score, clf = neural_problem()
    calls = []

    def counting_capture(run, device):
        replay, outputs = graphs.eager_capture(run, device)
        return (lambda: (calls.append(run), replay())[1]), outputs

    cache = graphs.GraphCache(capture=counting_capture)
    x = _images().requires_grad_(True)
    for _ in range(3):
        out = _graph(x, score, clf, cache)
        calls.clear()
        torch.autograd.grad(out.sum(), x)
    assert len(calls) == 1  # the backward replay; the forward replay came before the clear
    assert len(cache) == 1


# --------------------------------------------------------------------------- cache keys and LRU
def test_graph_keys_separate_every_configuration():
    score, clf = neural_problem()
    score2, _ = neural_problem(seed=1)
    x = _images()
    s = _setting(x, score, clf)
    base = graphs.graph_key(x, score, clf, s, "exact", True)
    assert base == graphs.graph_key(x.clone(), score, clf, s, "exact", True)
    variants = [
        graphs.graph_key(_images(4), score, clf, s, "exact", True),  # shape
        graphs.graph_key(x.double(), score, clf, s, "exact", True),  # dtype
        graphs.graph_key(x, score, clf, _setting(x, score, clf, t_star=0.006), "exact", True),  # grid
        graphs.graph_key(x, score, clf, _setting(x, score, clf, lam=2.0), "exact", True),  # guidance weight
        graphs.graph_key(x, score, clf, _setting(x, score, clf, mode="diffpure"), "exact", True),  # mode
        graphs.graph_key(x, score, clf, s, "detached-guidance", True),  # no Hessian term
        graphs.graph_key(x, score, clf, s, "exact", False),  # forward-only graph
        graphs.graph_key(x, score2, clf, s, "exact", True),  # another model
    ]
    rebound, _ = neural_problem()
    rebound.eps_model.out.weight = torch.nn.Parameter(rebound.eps_model.out.weight.clone())
    id_twin = graphs.graph_key(x, rebound, clf, s, "exact", True)
    rebound.eps_model.out.weight = torch.nn.Parameter(rebound.eps_model.out.weight.clone())
    variants.append(graphs.graph_key(x, rebound, clf, s, "exact", True))  # same module, rebound weight
    assert id_twin != variants[-1]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=True) if CUDA else _cuda_autocast_flag():
        variants.append(graphs.graph_key(x, score, clf, s, "exact", True))  # baked-in backend flags
    score.eps_model.train()  # the wrapper stays in eval mode; the net's dropout would not
    variants.append(graphs.graph_key(x, score, clf, s, "exact", True))
    score.eps_model.eval()
    with torch.inference_mode():  # its buffers would be inference tensors
        variants.append(graphs.graph_key(x, score, clf, s, "exact", False))
    for flag in ("enabled", "deterministic"):
        saved = getattr(torch.backends.cudnn, flag)
        setattr(torch.backends.cudnn, flag, not saved)
        variants.append(graphs.graph_key(x, score, clf, s, "exact", True))
        setattr(torch.backends.cudnn, flag, saved)
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(not flash)  # the attention kernel a capture records
    variants.append(graphs.graph_key(x, score, clf, s, "exact", True))
    torch.backends.cuda.enable_flash_sdp(flash)
    assert base == graphs.graph_key(x, score, clf, s, "exact", True)  # every flag restored
    assert len({base, *variants}) == len(variants) + 1
    # the forward-only key ignores the gradient kind (same graph)
    assert graphs.graph_key(x, score, clf, s, "exact", False) == graphs.graph_key(x, score, clf, s, "bpda", False)


class _cuda_autocast_flag:
    """torch.autocast('cuda') without a CUDA device: just flip the flag the key reads."""

    def __enter__(self):
        self.saved = torch.is_autocast_enabled("cuda")
        torch.set_autocast_enabled("cuda", True)

    def __exit__(self, *exc):
        torch.set_autocast_enabled("cuda", self.saved)


def test_lru_cache_is_bounded():
    built = []

    def build(name):
        return lambda capture: built.append(name) or name

    cache = graphs.GraphCache(max_size=2, capture=graphs.eager_capture)
    assert cache.get("a", build("a")) == "a"
    assert cache.get("b", build("b")) == "b"
    assert cache.get("a", build("a2")) == "a"  # hit: no rebuild, 'a' becomes most recent
    cache.get("c", build("c"))  # evicts 'b', the least recently used
    assert cache.keys() == ["a", "c"] and len(cache) == 2
    cache.get("b", build("b2"))
    assert built == ["a", "b", "c", "b2"] and cache.keys() == ["c", "b"]
    with pytest.raises(ValueError, match="max_size"):
        graphs.GraphCache(max_size=0)


def test_real_purify_calls_stay_within_the_bound():
    score, clf = neural_problem()
    cache = graphs.GraphCache(max_size=2, capture=graphs.eager_capture)
    with torch.no_grad():
        for batch in (1, 2, 3, 4):
            _graph(_images(batch), score, clf, cache)
    assert len(cache) == 2 and [k[1][0] for k in cache.keys()] == [3, 4]


# --------------------------------------------------------------------------- fallback
def _failing_capture(run, device):
    raise graphs.CaptureError("RuntimeError: operation not permitted when stream is capturing")


def test_capture_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    score, clf = neural_problem()
    cache = graphs.GraphCache(capture=_failing_capture)
    monkeypatch.setattr(ENGINE, "cache", cache)
    monkeypatch.setattr(ENGINE, "unsupported", lambda *a, **k: None)  # route CPU tensors to the graph engine
    clear_caches()
    x = _images().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"could not capture EpsilonScore/TinyClassifier .*running the eager"):
        out = purify(x, score, clf, generator=torch.Generator().manual_seed(4), engine="graph", **KW)
    xe = x.detach().clone().requires_grad_(True)
    expected = _eager(xe, score, clf, seed=4)
    assert torch.equal(out, expected)
    (g,) = torch.autograd.grad(out.sum(), x)
    (ge,) = torch.autograd.grad(expected.sum(), xe)
    assert torch.equal(g, ge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time; the failure is cached, no second attempt
        purify(x, score, clf, engine="graph", **KW)
    assert isinstance(cache.get(cache.keys()[0], None), graphs.CaptureFailed)


def test_warmup_errors_are_not_hidden():
    """A model that fails eagerly raises its own error, not a fallback warning."""
    _, clf = neural_problem()

    def broken(x, t):
        raise KeyError("broken score model")

    cache = graphs.GraphCache(capture=graphs.eager_capture)
    with pytest.raises(KeyError, match="broken score model"):
        _graph(_images(), broken, clf, cache)


# --------------------------------------------------------------------------- precision knobs
def test_precision_knobs():
    score, clf = neural_problem()
    with pytest.raises(ValueError, match="compute: expected one of"):
        Precision("fp16")
    assert prepare(score, Precision()) is score
    x = _images() * 2 - 1
    t = torch.full((3,), 0.05)
    ref = score(x, t)
    for prec in (Precision("bf16"), Precision("fp32", channels_last=True), Precision("tf32")):
        net = prepare(score, prec)
        out = net(x, t)
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    assert next(score.parameters()).is_contiguous()  # channels_last worked on a copy
    flags = backend_flags()
    with precision_context(Precision("tf32")):
        assert backend_flags() != flags
    assert backend_flags() == flags


def test_precision_context_after_the_per_backend_tf32_api():
    # torch >= 2.9: after fp32_precision is set, the legacy allow_tf32 getters raise
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision API")
    saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        matmul.fp32_precision = "tf32"
        flags = backend_flags()
        with precision_context(Precision("fp32")):
            assert backend_flags() != flags
        assert backend_flags() == flags
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- CUDA only
def _cuda_problem():
    score, clf = neural_problem()
    return score.cuda(), clf.cuda()


@needs_cuda
@pytest.mark.parametrize("mode", ["coup", "diffpure"])
def test_cuda_graph_matches_eager_bitwise(mode):
    score, clf = _cuda_problem()
    clear_caches()
    x = _images(device="cuda")
    with torch.no_grad():
        g = purify(x, score, clf, generator=torch.Generator().manual_seed(7), mode=mode, engine="graph", **KW)
        e = purify(x, score, clf, generator=torch.Generator().manual_seed(7), mode=mode, engine="eager", **KW)
    assert len(ENGINE.cache) == 1  # it was captured, not a fallback
    assert torch.equal(g, e)


@needs_cuda
def test_cuda_graph_draws_fresh_noise_per_call():
    score, clf = _cuda_problem()
    clear_caches()
    x = _images(device="cuda")
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        outs = [purify(x, score, clf, generator=gen, engine="graph", **KW) for _ in range(3)]
    assert len(ENGINE.cache) == 1
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    twin = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for out in outs:  # and each replay is the eager draw of its own seed
            assert torch.equal(out, purify(x, score, clf, generator=twin, engine="eager", **KW))


@needs_cuda
@pytest.mark.parametrize("gradient", ["exact", "detached-guidance"])
def test_cuda_graph_backward_matches_eager_bitwise(gradient, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # no atomics in either engine
    score, clf = _cuda_problem()
    clear_caches()
    x = _images(device="cuda")
    v = torch.randn_like(x)
    grads = {}
    for engine in ("graph", "eager"):
        for it in range(2):  # the second iteration replays both graphs
            xr = x.clone().requires_grad_(True)
            out = purify(xr, score, clf, generator=torch.Generator().manual_seed(9 + it), gradient=gradient,
                         engine=engine, **KW)
            (grads[engine, it],) = torch.autograd.grad(out, xr, v)
    assert len(ENGINE.cache) == 1
    for it in range(2):
        assert torch.equal(grads["graph", it], grads["eager", it])


@needs_cuda
def test_cuda_uncapturable_model_falls_back_with_warning():
    score, clf = _cuda_problem()
    clear_caches()

    class HostSync(torch.nn.Module):  # data-dependent control flow: a host sync inside the loop
        def forward(self, x, t):
            return score(x, t) if x.sum().item() > -1e9 else -score(x, t)

    sync_score = HostSync()
    x = _images(device="cuda")
    with pytest.warns(RuntimeWarning, match="could not capture HostSync"):
        with torch.no_grad():
            out = purify(x, sync_score, clf, generator=torch.Generator().manual_seed(1), engine="auto", **KW)
    with torch.no_grad():
        expected = purify(x, sync_score, clf, generator=torch.Generator().manual_seed(1), engine="eager", **KW)
    assert torch.equal(out, expected)
    with torch.no_grad():  # CUDA still works after the failed capture, and the graph engine for other models
        purify(x, score, clf, engine="graph", **KW)
    assert any(isinstance(ENGINE.cache.get(k, None), graphs.GraphEntry) for k in ENGINE.cache.keys())


@needs_cuda
def test_cuda_graph_recaptures_after_clear_cache():
    """PyTorch retires a graph pool with its last graph (and asserts if a capture names it again), so a
    capture after clear_cache() must use a fresh pool, also while a tensor of the old pool is alive."""
    score, clf = _cuda_problem()
    x = _images(device="cuda")
    alive = []
    for seed in range(3):
        clear_caches()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and runs eagerly
            with torch.no_grad():
                out = purify(x, score, clf, generator=torch.Generator().manual_seed(seed), engine="graph", **KW)
        (entry,) = [ENGINE.cache.get(k, None) for k in ENGINE.cache.keys()]
        assert isinstance(entry, graphs.GraphEntry)
        alive.append(entry.out)  # memory of the pool outlives the graph
        with torch.no_grad():
            assert torch.equal(out, purify(x, score, clf, generator=torch.Generator().manual_seed(seed),
                                           engine="eager", **KW))

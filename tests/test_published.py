"""The published attack (gradient='adjoint') on coup_fast's solver (coup_fast.published) against torchsde's
`sdeint_adjoint` (coup_fast.reference.purify_published, engine='torchsde'), on the same Brownian motion.

The reference is torchsde itself: its Euler forward and its continuous adjoint (adjoint SDE on [y, a],
the path reconstructed backwards) on a real torchsde BrownianInterval.  The fast path asks the same
BrownianInterval for its increments at the times torchsde asks them, so outputs and input gradients agree
to round-off.  Modes coup / reverse / diffpure; dt = 1e-3 and 0.02; t* = 0.1 and 0.075 (the L-inf and L2
presets' settings: t* = 0.1 / 0.075, dt = 1e-3, lam = 1); samples = K; the eager and compile engines here,
the graph engine with the CPU stand-in capture here and with real CUDA graphs on a GPU
(benchmarks/gpu_session.sh's `tests` stage).
"""
import gc
import json
import math
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torchsde._brownian import BaseBrownian

from coup_fast import engines, purify
from coup_fast.engines import graph as graphs
from coup_fast.precision import Precision, precision_context
from coup_fast.published import T_END, PhiloxPath, PublishedGrid, philox_tables
from coup_fast.reference import brownian_interval, purify_published, solve_published
from coup_fast.sde import ReverseGrid
from coup_fast.solver import NoiseStream, PurifyConfig, pipeline
from problems import analytic_problem, neural_problem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_published  # noqa: E402

F64 = torch.float64
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device; none on this machine")


def _x(shape=(2, 1, 4, 4), dtype=F64, seed=5, device="cpu"):
    return (0.2 + 0.6 * torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)).to(device)


def _out_and_grad(fn, x, upstream):
    xr = x.clone().requires_grad_(True)
    out = fn(xr)
    (grad,) = torch.autograd.grad((out * upstream).sum(), xr)
    return out.detach(), grad


def _assert_round_off(got, want, rtol):
    """got equals want to `rtol` of want's largest entry (outputs and gradients)."""
    for g, w in zip(got, want):
        err = float((g - w).abs().max() / w.abs().max().clamp_min(1e-300))
        assert err <= rtol, f"max error {err:.3g} relative to the largest entry, above {rtol}"


class RecordingBrownian(BaseBrownian):
    """A torchsde Brownian motion that records the (ta, tb) of every query, in order."""

    def __init__(self, bm):
        super().__init__()
        self.bm, self.queries = bm, []

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        self.queries.append((float(ta), float(tb)))
        return self.bm(ta, tb)

    def __repr__(self):
        return "RecordingBrownian"

    dtype = property(lambda self: self.bm.dtype)
    device = property(lambda self: self.bm.device)
    shape = property(lambda self: self.bm.shape)
    levy_area_approximation = property(lambda self: self.bm.levy_area_approximation)


# --------------------------------------------------------------------------- the grids are torchsde's
@pytest.mark.parametrize("t_star,dt", [(0.1, 0.02), (0.075, 1e-3), (0.075, 0.02)])
def test_the_fast_path_queries_the_brownian_motion_where_torchsde_does(t_star, dt):
    # torchsde's own queries (forward Euler steps, then its adjoint's, through ReverseBrownian) are the grid's:
    # the forward from t* to 1e-5, the adjoint from 1e-5 up by dt, not the forward's times reversed.
    score, clf = analytic_problem(d=4, dtype=F64)
    x = 2 * _x((2, 4)) - 1
    grid = ReverseGrid.from_dt(t_star, dt)
    config = PurifyConfig(grid, 1.0, "coup")
    rec = RecordingBrownian(brownian_interval(x, t_star, seed=1, t_end=T_END))
    xr = x.clone().requires_grad_(True)
    solve_published(xr, score, clf, config, bm=rec).sum().backward()
    published = PublishedGrid.of(grid)
    forward = [published.forward_step(k)[2] for k in range(published.n_forward)]
    backward = [published.backward_step(j)[2] for j in range(published.n_backward)]
    assert rec.queries == forward + backward  # bit for bit, in torchsde's order
    n = grid.n_steps
    assert len(forward) == len(backward) == n
    assert [1 - tau for tau, _ in forward] == pytest.approx([t_star - k * grid.h for k in range(n)], abs=1e-12)
    assert [published.backward_step(j)[0] for j in range(n)] == pytest.approx([T_END + j * grid.h for j in range(n)],
                                                                                abs=1e-12)
    assert forward[-1][1] - forward[-1][0] == pytest.approx(grid.h - T_END, abs=1e-12)  # the last step is 1e-5 short
    # the fast path's queries on a BrownianInterval are the same sequence
    fast = RecordingBrownian(brownian_interval(x, t_star, seed=1, t_end=T_END))
    u = _x((2, 4)).requires_grad_(True)
    purify_published(u, score, clf, t_star=t_star, dt=dt, bm=fast, engine="eager").sum().backward()
    assert fast.queries == rec.queries


# --------------------------------------------------------------------------- equal to torchsde, same BrownianInterval
CASES = [  # (mode, t*, dt, lam)
    ("coup", 0.1, 0.02, 1.5), ("reverse", 0.1, 0.02, 0.0), ("diffpure", 0.1, 0.02, 0.0),
    ("coup", 0.075, 0.02, 1.5),  # N = 4, h = 0.01875: dt does not divide t*
    ("coup", 0.1, 1e-3, 1.0),  # the L-inf preset's settings
    ("coup", 0.075, 1e-3, 1.0),  # the L2 preset's settings
    ("reverse", 0.075, 1e-3, 0.0), ("diffpure", 0.1, 1e-3, 0.0),
]


def _published(problem, mode, t_star, dt, lam, engine, seed=3, dtype=F64):
    """(out, grad) of the published pipeline on `engine` with a BrownianInterval of entropy `seed` (a fresh one
    per call: the same queries in the same order give the same path)."""
    if problem == "neural":
        (score, clf), x = neural_problem(dtype), _x(dtype=dtype)
    else:
        (score, clf), x = analytic_problem(d=6, dtype=dtype), _x((3, 6), dtype=dtype)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    eps = torch.randn(1, *x.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)

    def fn(u):
        bm = brownian_interval(u, t_star, seed=seed, t_end=T_END)
        return purify_published(u, score, clf, t_star=t_star, dt=dt, lam=lam, mode=mode, bm=bm,
                                noise=eps if mode == "diffpure" else None, engine=engine)

    return _out_and_grad(fn, x, upstream)


@pytest.mark.parametrize("mode,t_star,dt,lam", CASES, ids=lambda v: str(v))
def test_fast_path_equals_torchsde_on_one_brownian_interval(mode, t_star, dt, lam):
    want = _published("neural", mode, t_star, dt, lam, "torchsde")
    got = _published("neural", mode, t_star, dt, lam, "eager")
    assert want[1].abs().max() > 0
    _assert_round_off(got, want, 1e-12)


@pytest.mark.parametrize("mode", ["coup", "diffpure"])
def test_fast_path_equals_torchsde_on_the_analytic_problem_and_in_float32(mode):
    _assert_round_off(_published("analytic", mode, 0.1, 0.02, 1.5, "eager"),
                      _published("analytic", mode, 0.1, 0.02, 1.5, "torchsde"), 1e-12)
    _assert_round_off(_published("neural", mode, 0.1, 1e-3, 1.0, "eager", dtype=torch.float32),
                      _published("neural", mode, 0.1, 1e-3, 1.0, "torchsde", dtype=torch.float32), 1e-5)


def test_another_brownian_motion_gives_another_gradient():
    # the equality above is not a property of any two paths: the gradient depends on the noise
    a = _published("neural", "coup", 0.1, 0.02, 1.5, "eager", seed=3)
    b = _published("neural", "coup", 0.1, 0.02, 1.5, "torchsde", seed=4)
    assert float((a[1] - b[1]).abs().max() / b[1].abs().max()) > 1e-3


# --------------------------------------------------------------------------- purify: every engine, one Philox path
def _purify(engine, mode="coup", samples=1, seed=7, dtype=F64, dt=0.02, t_star=0.1, device="cpu", **kw):
    score, clf = neural_problem(dtype)
    score, clf = score.to(device), clf.to(device)
    x = _x(dtype=dtype, device=device)
    upstream = torch.randn((samples * 2, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    gen = torch.Generator().manual_seed(seed)
    return _out_and_grad(lambda u: purify(u, score, clf, t_star=t_star, dt=dt, lam=1.5, mode=mode, gradient="adjoint",
                                          engine=engine, generator=gen, samples=samples, **kw), x, upstream)


@pytest.mark.parametrize("mode", ["coup", "reverse", "diffpure"])
def test_purify_on_the_eager_engine_equals_the_torchsde_engine_on_one_seed(mode):
    # engine='torchsde' runs torchsde on the fast engines' Philox path: an A/B compares solvers, not noise
    _assert_round_off(_purify("eager", mode), _purify("torchsde", mode), 1e-12)
    _assert_round_off(_purify("auto", mode), _purify("eager", mode), 0.0)  # 'auto' on a CPU: the eager fast path


def test_samples_each_draw_their_own_path_as_separate_calls_would():
    k = 3
    batched = _purify("eager", "diffpure", samples=k)
    _assert_round_off(batched, _purify("torchsde", "diffpure", samples=k), 1e-12)
    # K separate calls with one generator draw the same K seeds in order; the upstream splits by sample
    score, clf = neural_problem(F64)
    x = _x()
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn((k * 2, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=F64)
    outs, grad = [], torch.zeros_like(x)
    for r in range(k):
        out, g = _out_and_grad(lambda u: purify(u, score, clf, t_star=0.1, dt=0.02, mode="diffpure",
                                                gradient="adjoint", engine="eager", generator=gen), x,
                               upstream[2 * r:2 * r + 2])
        outs.append(out)
        grad += g
    _assert_round_off(batched, (torch.cat(outs), grad), 1e-12)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # each its own path


def test_explicit_noise_is_one_grid_path_for_every_engine():
    # purify's `noise` for gradient='adjoint': increments on the forward grid, the adjoint's queries snapped to it
    score, clf = neural_problem(F64)
    x = _x()
    noise = torch.randn(5, *x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    runs = {engine: _out_and_grad(lambda u: purify(u, score, clf, t_star=0.1, dt=0.02, noise=noise, gradient="adjoint",
                                                   engine=engine), x, upstream) for engine in ("eager", "torchsde")}
    _assert_round_off(runs["eager"], runs["torchsde"], 1e-12)


def test_the_philox_path_is_one_brownian_motion_on_both_grids():
    # both grids are sums over one set of sub-interval draws: their increments add up to the same W(end) - W(start),
    # each sub-interval's draw is standard normal times sqrt(its length), and the long draws are purify's z_k
    grid = PublishedGrid.of(ReverseGrid.from_dt(0.1, 0.02))
    like = torch.empty(4000, 8, dtype=F64)
    path = PhiloxPath(grid, philox_tables([11], grid, "cpu"))
    forward = [path(*grid.forward_step(k)[2], like) for k in range(grid.n_forward)]
    backward = [path(*grid.backward_step(j)[2], like) for j in range(grid.n_backward)]
    torch.testing.assert_close(sum(forward), sum(backward), rtol=0, atol=1e-13)
    for (_, dtau, _), inc in zip(map(grid.forward_step, range(grid.n_forward)), forward):
        assert inc.var().item() == pytest.approx(dtau, rel=0.05)
    # forward step 1 and backward step 3 share the sub-interval [tau_1, 1 - (1e-5 + 3 h)]: covariance = its length
    (_, _, (a1, b1)), (_, _, (a3, b3)) = grid.forward_step(1), grid.backward_step(3)
    overlap = max(0.0, min(b1, b3) - max(a1, a3))
    assert overlap > 0 and (forward[1] * backward[3]).mean().item() == pytest.approx(overlap, rel=0.1)
    assert sorted(set(grid.counters)) == [*range(grid.n_forward), *range(grid.n_forward + 1, max(grid.counters) + 1)]


def test_memory_is_flat_in_the_number_of_steps():
    # the fast path keeps only the final state (the backward rebuilds the path): the tensors the autograd graph
    # holds after the forward do not grow with N, where the exact gradient's stored trajectory does
    score, clf = neural_problem(F64)

    def kept_bytes(gradient, dt):
        saved = []  # weak references: tensors saved only for a step's own guidance backward are freed by then
        x = _x().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
            out = purify(x, score, clf, t_star=0.1, dt=dt, gradient=gradient, memory="lean", engine="eager",
                         generator=torch.Generator().manual_seed(0))
        gc.collect()
        kept = {t.data_ptr(): t.numel() * t.element_size() for t in (ref() for ref in saved) if t is not None}
        assert out.requires_grad
        return sum(kept.values())

    assert kept_bytes("adjoint", 0.02) == kept_bytes("adjoint", 0.002)  # (weights alive anyway count in both)
    assert kept_bytes("exact", 0.002) > 5 * kept_bytes("exact", 0.02)


# --------------------------------------------------------------------------- engine choice
def test_engine_choice_for_the_published_attack():
    x = torch.rand(2, 1, 4, 4)
    assert "torchsde" in engines.CHOICES
    assert engines.select("auto", x, gradient="adjoint") is engines.ENGINES["eager"]
    assert engines.select("compile", x, gradient="adjoint") is engines.ENGINES["compile"]
    assert engines.select("torchsde", x, gradient="adjoint") is engines.PUBLISHED
    with pytest.warns(RuntimeWarning, match="engine='torchsde' runs the published attack"):
        engines.ENGINES["graph"]._warned.clear()
        assert engines.select("torchsde", x, gradient="exact") is engines.ENGINES["eager"]
    reason = engines.ENGINES["graph"].unsupported(x.cuda() if CUDA else x, gradient="adjoint", samples=4)
    assert reason is None if CUDA else "CUDA" in reason  # the published graph takes K samples


# --------------------------------------------------------------------------- the graph engine
def _graph_purify(engine, x, score, clf, config, seeds, upstream):
    stream = NoiseStream(x.repeat(len(seeds), 1, 1, 1), config)
    stream.seeds, stream.seed = list(seeds), seeds[0]
    return _out_and_grad(lambda u: pipeline(u.repeat(len(seeds), 1, 1, 1), config, stream, lambda s: engine.solve(
        s, score, clf, config, stream, "adjoint")), x, upstream)


@pytest.mark.parametrize("samples", [1, 2])
def test_graph_engine_replays_the_fast_path(samples):
    # the CPU stand-in capture keeps a CUDA graph's static-buffer contract: seeds written into the tables before
    # each replay, the backward replayed from the saved final state.  Bitwise the eager engine's, and torchsde's
    # to round-off; a second seed replays the same graphs with a fresh path.
    score, clf = neural_problem(F64)
    x = _x()
    config = PurifyConfig(ReverseGrid.from_dt(0.1, 0.02), 1.5, "coup")
    engine = graphs.GraphEngine(graphs.GraphCache(capture=graphs.eager_capture))
    upstream = torch.randn((samples * 2, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=F64)
    for seeds in ([5, 6][:samples], [8, 9][:samples]):
        got = _graph_purify(engine, x, score, clf, config, seeds, upstream)
        want = _graph_purify(engines.ENGINES["eager"], x, score, clf, config, seeds, upstream)
        _assert_round_off(got, want, 0.0)
        _assert_round_off(got, _graph_purify(engines.PUBLISHED, x, score, clf, config, seeds, upstream), 1e-12)
    assert len(engine.cache) == 1  # one capture, replayed with new seeds


@needs_cuda
@pytest.mark.parametrize("mode,samples", [("coup", 1), ("diffpure", 3)])
def test_graph_engine_on_cuda_equals_torchsde_on_the_same_path(mode, samples):
    # real CUDA graphs: the published loop and its adjoint captured, bitwise the eager engine's, torchsde's (fp32,
    # the same Philox path) to round-off; a second call draws a new seed through the same graphs
    from coup_fast import clear_caches

    clear_caches()
    with warnings.catch_warnings(), precision_context(Precision(), "cuda"):  # fp32 convolutions (no TF32 rounding)
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        for seed in (7, 8):
            kw = dict(mode=mode, samples=samples, seed=seed, dtype=torch.float32, dt=1e-3, device="cuda")
            got = _purify("graph", **kw)
            _assert_round_off(got, _purify("eager", **kw), 0.0)
            _assert_round_off(got, _purify("torchsde", **kw), 1e-4)
    assert len(graphs.ENGINE.cache) == 1


# --------------------------------------------------------------------------- the compile engine (compiles: few tests)
@pytest.mark.slow
def test_compile_engine_equals_torchsde_on_one_brownian_interval():
    _assert_round_off(_published("neural", "coup", 0.1, 0.02, 1.5, "compile"),
                      _published("neural", "coup", 0.1, 0.02, 1.5, "torchsde"), 1e-9)
    _assert_round_off(_purify("compile", "coup", samples=2), _purify("torchsde", "coup", samples=2), 1e-9)


def test_published_grid_rejects_queries_off_the_grid():
    grid = PublishedGrid.of(ReverseGrid.from_dt(0.1, 0.02))
    path = PhiloxPath(grid, philox_tables([1], grid, "cpu"))
    with pytest.raises(ValueError, match="^noise: the Brownian path was queried at tau"):
        path(0.9, 0.95, torch.empty(2, 3))
    assert math.isclose(grid.forward[-1], 1 - T_END) and grid.n_counters == 2 * grid.n_forward


def test_the_benchmark_runs_and_its_rows_agree(tmp_path):
    # benchmarks/bench_published.py, tiny (N = 2, B = 2), so that it does not rot: no timed assertions, only that
    # every row ran and the fast row's gradient is torchsde's on the same path
    out = tmp_path / "published.json"
    report = bench_published.main(["--dt", "0.05", "--batch", "2", "--repeats", "1", "--no-memory", "--out", str(out)])
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == set(bench_published.ROWS) and json.loads(out.read_text())["rows"]
    assert all(math.isfinite(r["seconds"]) and r["seconds"] > 0 for r in rows.values())
    assert rows["published-fast"]["max_rel_torchsde"] < 1e-4 and rows["published-fast"]["cos_torchsde"] > 0.9999


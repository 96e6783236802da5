"""CUDA-graph engine: the purification loop and its exact adjoint, each captured once and replayed.

Per configuration (device, shape, dtype, Setting, gradient kind, model ids, backend flags) the
N-step guided loop (Eq. 5: score net, guidance with its autograd.grad, fused step) is captured in
one CUDA graph and, when a gradient is needed, the discrete adjoint (DESIGN.md: per-step
recompute, VJPs incl. lam H via create_graph guidance, fused adjoint_update) in a second.  A
PGD/APGD iteration is then two replays.  The fused step reads (seed, k) from a device table, so
writing a new seed into column 0 before a replay draws fresh noise with no rebuild.

All graphs of a device share one memory pool.  Static outputs are cloned right after each replay;
a trajectory is trusted by the backward only while no other graph has replayed since its forward
(another graph's temporaries may reuse its memory), otherwise the forward is replayed again from
the saved input and seed: same noise, bitwise the same trajectory.  So K EOT samples of one
configuration cost K - 1 extra forward replays in the backward, not K trajectories of memory.

Graphs bake in parameter addresses: weights updated in place (load_state_dict, optimizer steps)
are seen by the next replay; rebound weights (model.half(), p.data = ...) change the key and are
captured anew.  `clear_cache()` frees every graph.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
import weakref
from collections import OrderedDict

import torch

from . import ops
from .guidance import image_to_state, state_to_image
from .noise import draw_seed, rng_table
from .precision import backend_flags
from .purify import adjoint_solve, solve
from .sde import ReverseGrid, diffuse

ENGINES = ("auto", "eager", "graph", "compile")
CACHE_SIZE = int(os.environ.get("COUP_FAST_GRAPH_CACHE", "8"))
WARMUP_RUNS = 2  # on a side stream before capture: cuDNN/Triton autotuning, lazy autograd state
WARMUP_STEPS = 2  # every step launches the same kernels, so a short loop warms them all

_WARNED: set = set()
_POOLS: dict = {}  # device -> (pool handle, WeakSet of the live graphs captured into it)
_clock = [0]  # counts replays of any graph: a trajectory is valid only while nothing else ran


class CaptureError(RuntimeError):
    """Recording into a CUDA graph failed (host sync, data-dependent control flow, ...)."""


def warn_once(message: str):
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_engine(engine):
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")


def unsupported(x, noise=None, gradient="exact") -> str | None:
    """Why the graph engine cannot run this call, or None."""
    if not x.is_cuda:
        return f"x is on {x.device}; CUDA graphs need CUDA tensors"
    if noise is not None:
        return "an explicit `noise` tensor was given (the graph draws counter-based noise itself)"
    if gradient == "adjoint":
        return "gradient='adjoint' runs torchsde's adjoint"
    return None


def use_graph(engine, x, noise=None, gradient="exact") -> bool:
    """True when `purify` should run on the graph engine: 'auto' on CUDA, or 'graph' where it can."""
    check_engine(engine)
    if engine in ("eager", "compile"):
        return False
    reason = unsupported(x, noise, gradient)
    if reason is not None and engine == "graph":
        warn_once(f"coup_fast: engine='graph' runs the eager engine instead: {reason}")
    return reason is None


def cuda_capture(run, device):
    """Warm `run(steps)` up on a side stream, then record run(None) in a CUDA graph.

    Returns (replay, outputs): replay() re-runs the recorded kernels, refreshing `outputs` in place.
    """
    device = torch.device(device)
    # Autocast caches its casts of weights that require grad outside the graph's memory pool and
    # frees them when the user's autocast region ends: a graph recorded over a cached cast would
    # replay reading freed memory.  Same autocast settings, no cache.
    autocast = torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                              dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    with torch.cuda.device(device), autocast:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run(WARMUP_STEPS)
        torch.cuda.current_stream().wait_stream(side)
        pool, members = _shared_pool(device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                outputs = run(None)
        except Exception as err:  # the capture is invalidated; eager work is unaffected
            try:
                torch.cuda.synchronize(device)
            except Exception:
                pass
            cause = err.__context__ if err.__context__ is not None else err
            if isinstance(err, torch.cuda.OutOfMemoryError) or isinstance(cause, torch.cuda.OutOfMemoryError):
                raise  # not a property of the models: no permanent eager fallback, the caller sees it
            raise CaptureError(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from err
        members.add(graph)
    return graph.replay, outputs


def _shared_pool(device):
    """The device's graph memory pool, and the set of live graphs that use it.

    PyTorch retires a pool once every graph captured into it is destroyed, and a later capture
    that names the retired handle fails an internal assert (CUDACachingAllocator: use_count > 0).
    So a pool lives as long as one of its graphs does; after clear_cache() (or evicting the last
    graph) the next capture starts a fresh pool."""
    pool, members = _POOLS.get(device, (None, None))
    if pool is None or len(members) == 0:
        pool, members = torch.cuda.graph_pool_handle(), weakref.WeakSet()
        _POOLS[device] = (pool, members)
    return pool, members


def eager_capture(run, device):
    """CPU stand-in for `cuda_capture` with the same static-buffer contract (tests, debugging):
    replay() re-runs `run` and copies the results into the first call's outputs."""
    outputs = run(None)

    def replay():
        with torch.no_grad():
            for static, fresh in zip(_flat(outputs), _flat(run(None))):
                static.copy_(fresh)

    return replay, outputs


def _flat(tree):
    if torch.is_tensor(tree):
        return [tree]
    return [t for item in (tree or ()) for t in _flat(item)]


def _replay(replay):
    _clock[0] += 1
    replay()


class _TableNoise:
    """purify.Noise's counter-based stream, reading its (seed, k) rows from a static table."""

    def __init__(self, table):
        self.table = table

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float):
        return ops.em_step(x, score, guidance, self.table[k], beta_dt, lam)


def _first_steps(setting, steps):
    if steps is None or steps >= setting.grid.n_steps:
        return setting
    return dataclasses.replace(setting, grid=ReverseGrid(setting.grid.t_star, steps))


class GraphEntry:
    """The graphs and static buffers of one configuration (holding its models alive)."""

    def __init__(self, x, score_model, classifier, setting, with_grad: bool, with_hessian: bool, capture):
        self.models, self.setting = (score_model, classifier), setting
        self.x_in = x.detach().contiguous().clone()  # warm-up runs on real inputs
        self.table = rng_table(0, setting.grid.n_steps + 1, x.device)
        self.owner, self.epoch = None, -1
        self.replay_forward, (self.out, self.trajectory) = capture(self._forward_loop(with_grad), x.device)
        self.replay_backward = None
        if with_grad:
            self.grad_out = torch.zeros_like(self.x_in)
            with torch.no_grad():  # a capture runs nothing: fill the trajectory the backward warms up on
                _replay(self.replay_forward)
            self.replay_backward, self.grad_in = capture(self._backward_loop(with_hessian), x.device)

    def _forward_loop(self, keep_trajectory: bool):
        score_model, classifier = self.models
        source = _TableNoise(self.table)

        def run(steps):
            trajectory = [] if keep_trajectory else None
            with torch.no_grad():
                out = solve(self.x_in, score_model, classifier, _first_steps(self.setting, steps), source,
                            trajectory=trajectory)
            return out, trajectory

        return run

    def _backward_loop(self, with_hessian: bool):
        def run(steps):
            return adjoint_solve(self.trajectory, self.grad_out, *self.models, self.setting, with_hessian, steps)

        return run

    def write_seed(self, seed: int):
        # A fill with a host scalar: one launch, no sync, and no pinned buffer to outlive.
        self.table[:, 0].fill_(seed)

    def forward(self, x, seed: int, token=None) -> torch.Tensor:
        """x_N for start state x and noise `seed` (a copy of the static output)."""
        with torch.no_grad():
            self.x_in.copy_(x)
            self.write_seed(seed)
            _replay(self.replay_forward)
            self.owner, self.epoch = token, _clock[0]
            return self.out.clone()

    def holds(self, token) -> bool:
        """Is the trajectory in the buffers the one of forward call `token`?"""
        return token is not None and self.owner is token and self.epoch == _clock[0]

    def backward(self, grad) -> torch.Tensor:
        """a_0 for a_N = grad, on the trajectory currently held."""
        with torch.no_grad():
            self.grad_out.copy_(grad)
            _replay(self.replay_backward)
            self.epoch = _clock[0]  # captured while the trajectory was live, so it left it intact
            return self.grad_in.clone()


@dataclasses.dataclass
class CaptureFailed:
    """Cache marker: this configuration runs eagerly (the capture raised `reason`)."""

    reason: str
    models: tuple


class GraphCache:
    """LRU of GraphEntry by configuration key, at most `max_size` entries."""

    def __init__(self, max_size: int = CACHE_SIZE, capture=None):
        if not (isinstance(max_size, int) and max_size >= 1):
            raise ValueError(f"max_size: expected an int >= 1, got {max_size!r}")
        self.max_size, self.capture = max_size, capture or cuda_capture
        self._entries: OrderedDict = OrderedDict()

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def keys(self):
        return list(self._entries)

    def get(self, key, build):
        """The entry of `key`, built with build(capture) on a miss; evicts the least recently used."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = self._entries[key] = build(self.capture)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        return entry

    def clear(self):
        self._entries.clear()


_CACHE = GraphCache()


def clear_cache():
    """Drop every captured graph (after rebinding model weights, or to free their memory)."""
    _CACHE.clear()


def _model_state(model) -> tuple:
    """A module's train/eval flags (every submodule: a wrapper's own flag says nothing of its net's
    dropout) and its tensors' addresses (a rebound weight, model.half() or p.data = ..., means a new
    graph).  A plain callable is known by its identity only: rebinding the tensors it closes over
    needs clear_cache()."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return (tuple(m.training for m in model.modules()),
            tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))


def graph_key(x, score_model, classifier, setting, gradient: str, with_grad: bool) -> tuple:
    """What a captured graph depends on besides the values in its static buffers and weights."""
    kind = ("grad", gradient == "exact") if with_grad else ("forward",)
    models = tuple((id(m), _model_state(m)) for m in (score_model, classifier))
    return (str(x.device), tuple(x.shape), x.dtype, setting, kind, models, backend_flags(),
            torch.is_inference_mode_enabled())  # buffers made in inference mode are inference tensors


class _GraphSolve(torch.autograd.Function):
    """x_N = solve(x) by a forward replay; its vector-Jacobian product by a backward replay."""

    @staticmethod
    def forward(ctx, x, entry, seed):
        ctx.entry, ctx.seed, ctx.token = entry, seed, object()
        ctx.save_for_backward(x)
        return entry.forward(x, seed, ctx.token)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if not ctx.entry.holds(ctx.token):  # another replay may have reused the trajectory's memory
            ctx.entry.forward(x, ctx.seed, ctx.token)
        return ctx.entry.backward(grad_out), None, None


def purify_graph(x, score_model, classifier, setting, generator=None, gradient="exact", cache=None):
    """`purify` (already validated into `setting`) on the graph engine; differentiable in x.

    Bitwise equal to the eager engine for the same generator state.  Returns None when the models
    cannot be captured (one warning per model pair), and the caller runs the eager engine.
    """
    cache = _CACHE if cache is None else cache
    with_grad = torch.is_grad_enabled() and x.requires_grad and gradient != "bpda"
    key = graph_key(x, score_model, classifier, setting, gradient, with_grad)

    def build(capture):
        try:
            return GraphEntry(image_to_state(x.detach()), score_model, classifier, setting, with_grad,
                              gradient == "exact", capture)
        except CaptureError as err:
            return CaptureFailed(str(err), (score_model, classifier))

    entry = cache.get(key, build)
    if isinstance(entry, CaptureFailed):
        names = "/".join(type(m).__name__ for m in (score_model, classifier))
        warn_once(f"coup_fast: could not capture {names} in a CUDA graph ({entry.reason}); running the eager "
                  "engine. Models with host syncs or data-dependent control flow (.item(), .cpu(), nonzero) "
                  "cannot be captured; engine='eager' skips the attempt.")
        return None
    seed = draw_seed(generator)  # the same draw the eager engine makes, so both see the same noise
    start = state = image_to_state(x)
    if setting.mode == "diffpure":
        entry.write_seed(seed)
        state = diffuse(state, setting.grid.t_star, ops.normal_noise(state.detach(), entry.table[-1]), setting.diffusion)
    if with_grad:
        out = _GraphSolve.apply(state, entry, seed)
    else:
        out = entry.forward(state, seed)
    if gradient == "bpda":  # straight-through, as purify_state does
        out = start + (out - start).detach()
    return state_to_image(out).clamp(0.0, 1.0)

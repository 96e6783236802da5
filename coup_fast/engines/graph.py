"""CUDA-graph engine: the purification loop and its exact adjoint, each captured once and replayed.

Per configuration (device, shape, dtype, PurifyConfig, gradient kind, model ids, backend flags) the
N-step guided loop (Eq. 5: score net, guidance with its autograd.grad, fused step) is captured in
one CUDA graph and, when a gradient is needed, the discrete adjoint (docs/design.md §3: per-step
recompute, VJPs incl. lam H via create_graph guidance, fused adjoint_update) in a second.  A
PGD/APGD iteration is then two replays.  The fused step reads (seed, k) from a device table, so
writing a new seed into column 0 before a replay draws fresh noise with no rebuild.

All graphs of a device share one memory pool.  Static outputs are cloned right after each replay;
a trajectory is trusted by the backward only while no other graph has replayed since its forward
(another graph's temporaries may reuse its memory), otherwise the forward is replayed again from
the saved input and seed: same noise, bitwise the same trajectory.  So K EOT samples of one
configuration cost K - 1 extra forward replays in the backward, not K trajectories of memory.

The published attack (gradient='adjoint', coup_fast.published) is captured the same way: the forward on
the official grid, and torchsde's continuous adjoint, which rebuilds the path from the final state, so its
backward graph needs no trajectory (nothing to trust or replay again) and memory stays flat in N.  Its
Philox path reads one (seed, counter) table per sample, so batched EOT (samples = K) is captured too.

Graphs bake in parameter addresses: weights updated in place (load_state_dict, optimizer steps)
are seen by the next replay; rebound weights (model.half(), p.data = ...) change the key and are
captured anew.  The engine owns its graphs, pools and warnings; coup_fast.clear_caches() frees them.
Outputs and gradients are bitwise equal to the eager engine's (docs/design.md §6).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import warnings
import weakref
from collections import OrderedDict

import torch

from .. import ops
from ..adjoint import Recompute, adjoint_solve
from ..networks import EagerNetworks
from ..noise import rng_table
from ..precision import backend_flags
from ..published import PhiloxPath, PublishedGrid, philox_tables, published_adjoint, published_forward
from ..solver import PurifyConfig, recording_drift, plain_drift, solve
from ..sde import ReverseGrid

CACHE_SIZE = int(os.environ.get("COUP_FAST_GRAPH_CACHE", "8"))
WARMUP_RUNS = 2  # on a side stream before capture: cuDNN/Triton autotuning, lazy autograd state
WARMUP_STEPS = 2  # every step launches the same kernels, so a short loop warms them all


class CaptureError(RuntimeError):
    """Recording into a CUDA graph failed (host sync, data-dependent control flow, ...)."""


class _Pools:
    """The graph memory pool of each device, and the set of live graphs that use it.

    PyTorch retires a pool once every graph captured into it is destroyed, and a later capture
    that names the retired handle fails an internal assert (CUDACachingAllocator: use_count > 0).
    So a pool lives as long as one of its graphs does; after coup_fast.clear_caches() (or evicting the
    last graph) the next capture starts a fresh pool."""

    def __init__(self):
        self._pools: dict = {}  # device -> (pool handle, WeakSet of the live graphs captured into it)

    def get(self, device):
        pool, members = self._pools.get(device, (None, None))
        if pool is None or len(members) == 0:
            pool, members = torch.cuda.graph_pool_handle(), weakref.WeakSet()
            self._pools[device] = (pool, members)
        return pool, members

    def clear(self):
        self._pools.clear()


def cuda_capture(run, device, pools: _Pools):
    """Warm `run(steps)` up on a side stream, then record run(None) in a CUDA graph.

    Returns (replay, outputs): replay() re-runs the recorded kernels, refreshing `outputs` in place.
    `pools`: the devices' shared graph memory pools (one per GraphCache).
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
        pool, members = pools.get(device)
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


class ReplayClock:
    """Counts the replays of the graphs of one GraphCache: a trajectory left in a graph's buffers is valid
    only while no other graph (whose temporaries may reuse its memory) has replayed since."""

    def __init__(self):
        self.ticks = 0

    def replay(self, replay):
        self.ticks += 1
        replay()


class _TableNoise:
    """NoiseStream's counter-based stream, reading its (seed, k) rows from a static table."""

    def __init__(self, table):
        self.table = table

    def step(self, x, score, guidance, k: int, beta_dt: float, lam: float):
        return ops.em_step(x, score, guidance, self.table[k], beta_dt, lam)


def _warmup_config(config: PurifyConfig, n_steps):
    """The configuration with its first n_steps steps only (None: all), for a short warm-up loop."""
    if n_steps is None or n_steps >= config.grid.n_steps:
        return config
    return dataclasses.replace(config, grid=ReverseGrid(config.grid.t_star, n_steps))


class GraphEntry:
    """The graphs and static buffers of one configuration (holding its models alive)."""

    def __init__(self, x, score_model, classifier, config, with_grad: bool, with_hessian: bool, capture, clock):
        self.models, self.config, self.clock = (score_model, classifier), config, clock
        self.nets = EagerNetworks(score_model, classifier)
        self.x_in = x.detach().contiguous().clone()  # warm-up runs on real inputs
        self.table = rng_table(0, config.grid.n_steps + 1, x.device)
        self.owner, self.epoch = None, -1
        self.replay_forward, (self.out, self.trajectory) = capture(self._forward_loop(with_grad), x.device)
        self.replay_backward = None
        if with_grad:
            self.grad_out = torch.zeros_like(self.x_in)
            with torch.no_grad():  # a capture runs nothing: fill the trajectory the backward warms up on
                self.clock.replay(self.replay_forward)
            self.replay_backward, self.grad_in = capture(self._backward_loop(with_hessian), x.device)

    def _forward_loop(self, keep_trajectory: bool):
        stream = _TableNoise(self.table)

        def run(n_steps):
            trajectory = [] if keep_trajectory else None
            config = _warmup_config(self.config, n_steps)
            drift = recording_drift(self.nets, config.lam, trajectory) if keep_trajectory else \
                plain_drift(self.nets, config.lam)
            with torch.no_grad():
                out = solve(self.x_in, config, stream, drift)
            return out, trajectory

        return run

    def _backward_loop(self, with_hessian: bool):
        def run(n_steps):
            step_vjps = Recompute(self.trajectory, self.nets, self.config, with_hessian)
            return adjoint_solve(step_vjps, self.grad_out, self.config, first_steps=n_steps)

        return run

    def write_seed(self, seed: int):
        # A fill with a host scalar: one launch, no sync, and no pinned buffer to outlive.
        self.table[:, 0].fill_(seed)

    def forward(self, x, seed: int, token=None) -> torch.Tensor:
        """x_N for start state x and noise `seed` (a copy of the static output)."""
        with torch.no_grad():
            self.x_in.copy_(x)
            self.write_seed(seed)
            self.clock.replay(self.replay_forward)
            self.owner, self.epoch = token, self.clock.ticks
            return self.out.clone()

    def holds(self, token) -> bool:
        """Is the trajectory in the buffers the one of forward call `token`?"""
        return token is not None and self.owner is token and self.epoch == self.clock.ticks

    def backward(self, grad) -> torch.Tensor:
        """a_0 for a_N = grad, on the trajectory currently held."""
        with torch.no_grad():
            self.grad_out.copy_(grad)
            self.clock.replay(self.replay_backward)
            self.epoch = self.clock.ticks  # captured while the trajectory was live, so it left it intact
            return self.grad_in.clone()


class PublishedEntry:
    """The published attack's graphs of one configuration (coup_fast.published): the forward on the official grid,
    and the continuous adjoint from the final state.  One Philox table per sample; writing the K seeds before a
    replay draws K fresh paths."""

    def __init__(self, x, score_model, classifier, config, samples: int, with_grad: bool, capture, clock):
        self.models, self.config, self.clock = (score_model, classifier), config, clock
        self.nets = EagerNetworks(score_model, classifier)
        self.x_in = x.detach().contiguous().clone()  # warm-up runs on real inputs
        self.tables = philox_tables([0] * samples, PublishedGrid.of(config.grid), x.device)
        self.path = PhiloxPath(PublishedGrid.of(config.grid), self.tables)
        self.replay_forward, self.out = capture(self._forward_loop, x.device)
        self.replay_backward = None
        if with_grad:
            self.y_in, self.grad_out = torch.zeros_like(self.x_in), torch.zeros_like(self.x_in)
            with torch.no_grad():  # a capture runs nothing: the backward warms up on a real final state
                self.clock.replay(self.replay_forward)
                self.y_in.copy_(self.out)
            self.replay_backward, self.grad_in = capture(self._backward_loop, x.device)

    def _forward_loop(self, n_steps):
        with torch.no_grad():
            return published_forward(self.x_in, self.nets, self.config, self.path, n_steps)

    def _backward_loop(self, n_steps):
        return published_adjoint(self.y_in, self.grad_out, self.nets, self.config, self.path, n_steps)

    def write_seeds(self, seeds):
        for table, seed in zip(self.tables, seeds):
            table[:, 0].fill_(seed)

    def forward(self, x, seeds) -> torch.Tensor:
        """The final state for start state x and the samples' seeds (a copy of the static output)."""
        with torch.no_grad():
            self.x_in.copy_(x)
            self.write_seeds(seeds)
            self.clock.replay(self.replay_forward)
            return self.out.clone()

    def backward(self, y, grad, seeds) -> torch.Tensor:
        """dL/dx_0 for final state y and grad = dL/dy, on the seeds' paths."""
        with torch.no_grad():
            self.y_in.copy_(y)
            self.grad_out.copy_(grad)
            self.write_seeds(seeds)
            self.clock.replay(self.replay_backward)
            return self.grad_in.clone()


class _PublishedGraphSolve(torch.autograd.Function):
    """The published solve by a forward replay; its adjoint by a backward replay from the saved final state."""

    @staticmethod
    def forward(ctx, x, entry, seeds):
        out = entry.forward(x, seeds)
        ctx.entry, ctx.seeds = entry, seeds
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        return ctx.entry.backward(out, grad_out, ctx.seeds), None, None


@dataclasses.dataclass
class CaptureFailed:
    """Cache marker: this configuration runs eagerly (the capture raised `reason`)."""

    reason: str
    models: tuple


class GraphCache:
    """LRU of GraphEntry by configuration key, at most `max_size` entries.  Its graphs share one memory
    pool per device (cuda_capture) and one replay clock."""

    def __init__(self, max_size: int = CACHE_SIZE, capture=None):
        if not (isinstance(max_size, int) and max_size >= 1):
            raise ValueError(f"max_size: expected an int >= 1, got {max_size!r}")
        self.max_size, self.capture = max_size, capture or functools.partial(cuda_capture, pools=_Pools())
        self.clock = ReplayClock()
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


def _model_state(model) -> tuple:
    """A module's train/eval flags (every submodule: a wrapper's own flag says nothing of its net's
    dropout) and its tensors' addresses (a rebound weight, model.half() or p.data = ..., means a new
    graph).  A plain callable is known by its identity only: rebinding the tensors it closes over
    needs coup_fast.clear_caches()."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return (tuple(m.training for m in model.modules()),
            tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))


def graph_key(x, score_model, classifier, config, gradient: str, with_grad: bool, samples: int = 1) -> tuple:
    """What a captured graph depends on besides the values in its static buffers and weights."""
    if gradient == "adjoint":  # another grid and another backward; one Philox table per sample
        kind = ("published", with_grad, samples)
    else:
        kind = ("grad", gradient == "exact") if with_grad else ("forward",)
    models = tuple((id(m), _model_state(m)) for m in (score_model, classifier))
    return (str(x.device), tuple(x.shape), x.dtype, config, kind, models, backend_flags(),
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


class GraphEngine:
    """engine='graph' (and 'auto' on CUDA): the solve replayed from captured CUDA graphs.

    cache: the GraphCache of captured configurations (its `capture` is cuda_capture, or eager_capture
    to exercise everything but the recording on a CPU).
    """

    name = "graph"

    def __init__(self, cache: GraphCache | None = None):
        self.cache = cache if cache is not None else GraphCache()  # (an empty cache is falsy)
        self._warned: set = set()

    def unsupported(self, x, noise=None, gradient="exact", samples=1) -> str | None:
        """Why this engine cannot run the call, or None."""
        if not x.is_cuda:
            return f"x is on {x.device}; CUDA graphs need CUDA tensors"
        if noise is not None:
            return "an explicit `noise` tensor was given (the graph draws counter-based noise itself)"
        if samples > 1 and gradient != "adjoint":
            return "samples > 1 (a captured graph of the exact gradient reads one seed)"
        return None

    def warn_once(self, message: str):
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def solve(self, x, score_model, classifier, config, stream, gradient="exact", memory="lean"):
        """x_N from start state x, differentiable in x (bitwise the eager engine's), or None when the
        models cannot be captured (one warning per model pair; the caller runs eagerly)."""
        with_grad = torch.is_grad_enabled() and x.requires_grad
        samples = len(stream.seeds)
        key = graph_key(x, score_model, classifier, config, gradient, with_grad, samples)

        def build(capture):
            try:
                if gradient == "adjoint":
                    return PublishedEntry(x.detach(), score_model, classifier, config, samples, with_grad, capture,
                                          self.cache.clock)
                return GraphEntry(x.detach(), score_model, classifier, config, with_grad, gradient == "exact", capture,
                                  self.cache.clock)
            except CaptureError as err:
                return CaptureFailed(str(err), (score_model, classifier))

        entry = self.cache.get(key, build)
        if isinstance(entry, CaptureFailed):
            names = "/".join(type(m).__name__ for m in (score_model, classifier))
            self.warn_once(f"coup_fast: could not capture {names} in a CUDA graph ({entry.reason}); running the eager "
                           "engine. Models with host syncs or data-dependent control flow (.item(), .cpu(), nonzero) "
                           "cannot be captured; engine='eager' skips the attempt.")
            return None
        if gradient == "adjoint":
            seeds = list(stream.seeds)
            return _PublishedGraphSolve.apply(x, entry, seeds) if with_grad else entry.forward(x, seeds)
        if with_grad:
            return _GraphSolve.apply(x, entry, stream.seed)
        return entry.forward(x, stream.seed)

    def clear(self):
        self.cache.clear()
        self._warned.clear()


ENGINE = GraphEngine()

"""The exact gradient: the discrete adjoint of the solve (docs/design.md §3).

    a_k = a_{k+1} + beta_k h (a_{k+1}/2 + J_s^T a_{k+1} + lam H a_{k+1}),   k = N-1 .. 0

`adjoint_solve` walks it over step VJPs: from a step graph kept by the forward (`KeptStep`), or
recomputed from the stored state x_k (`Recompute`).  How many step graphs the forward keeps is the
`memory` argument (`memory_budget`):

- 'lean': none; x_0 .. x_{N-1} are stored and one step's graph is recomputed at a time.
- 'fast': every step's graph (N steps of activations, no recompute).
- a budget, 'auto' (the default: AUTO_FRACTION of the device's free memory, `free_memory`), a number
  of bytes, a size ('512MiB', '2GB') or a share of free memory ('40%'): the first step graphs are kept
  while they fit, the remaining steps store their state and are recomputed.  Step 0's graph is measured (the bytes
  of the distinct storages its backward holds, `graph_bytes`) and the steps that fit are planned
  from it (`plan_kept_steps`), counting the states stored for the other steps and the one graph
  recomputed at a time in the backward.

Under a budget a kept step runs the same network calls on the same inputs as a recomputed one and
drifts with the same (plain-backward) guidance, so 'auto' and every budget give bitwise memory='lean''s
output and gradient (tests/test_purify.py).  memory='fast' is as it was: its steps drift with the
guidance of the create_graph backward, which for some activations (SiLU) rounds differently, so its
bits may differ from 'lean''s by round-off.  `ExactSolve` is the autograd Function that runs the solve
forward and this adjoint backward.
"""
from __future__ import annotations

import numbers
import os
import re

import torch

from . import ops
from .networks import vjp_from_graph
from .solver import PurifyConfig, plain_drift, solve

MEMORY = ("auto", "lean", "fast")  # the named choices; a budget in bytes, a size or a percentage also goes
AUTO_FRACTION = 0.25  # memory='auto': the kept step graphs may take this share of the device's free memory
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def check_memory(memory):
    """memory= checked: 'auto', 'lean', 'fast', a budget in bytes (an int >= 0), a size string ('512MiB',
    '2GB', '1.5 GiB'; K/M/G/T alone are binary) or a share of free memory ('40%').  Returns it
    normalised ('auto' / 'lean' / 'fast', bytes as an int, or a fraction as a float in (0, 1]);
    raises ValueError naming memory otherwise."""
    expected = ("memory: expected 'auto', 'lean', 'fast', a budget in bytes (int >= 0), a size such as '2GiB' "
                f"or a share of free memory such as '40%', got {memory!r}")
    if isinstance(memory, str):
        if memory in MEMORY:
            return memory
        percent = _PERCENT.match(memory)
        if percent:
            share = float(percent.group(1)) / 100
            if not 0 < share <= 1:
                raise ValueError(expected)
            return share
        size = _SIZE.match(memory)
        if size and size.group(2).lower() in _UNITS:
            return int(float(size.group(1)) * _UNITS[size.group(2).lower()])
        raise ValueError(expected)
    if isinstance(memory, numbers.Integral) and not isinstance(memory, bool) and memory >= 0:
        return int(memory)
    raise ValueError(expected)


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (containers), or None without one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def free_memory(device) -> int:
    """Bytes free for new tensors on `device`: on CUDA the driver's free memory plus what torch's caching
    allocator holds unused; elsewhere the host's available memory (MemAvailable, under a cgroup limit
    if there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 2**30  # unknown: assume 1 GiB
    cgroup = _cgroup_free()
    return available if cgroup is None else min(available, cgroup)


def memory_budget(memory, device) -> int | None:
    """The bytes the kept step graphs may take for memory= on `device`: None = no limit ('fast'),
    0 = keep none ('lean')."""
    memory = check_memory(memory)
    if memory == "fast":
        return None
    if memory == "lean":
        return 0
    if memory == "auto":
        memory = AUTO_FRACTION
    if isinstance(memory, float):
        return int(memory * free_memory(device))
    return memory


def plan_kept_steps(n_steps: int, graph_bytes: int, state_bytes: int, budget: int | None) -> int:
    """How many of the first steps keep their graphs: all N if N graphs fit the budget; else the most
    K for which K graphs, the N - K stored states and one graph recomputed at a time in the backward
    fit (0: every step recomputed, memory='lean')."""
    if budget is None or n_steps * graph_bytes <= budget:
        return n_steps
    per_kept = max(graph_bytes - state_bytes, 1)
    return max(0, min(n_steps - 1, (budget - graph_bytes - n_steps * state_bytes) // per_kept))


_SAVED_NAMES: dict = {}  # autograd node type -> the names of its saved-tensor attributes


def _saved_names(node) -> tuple:
    kind = type(node)
    names = _SAVED_NAMES.get(kind)
    if names is None:
        names = _SAVED_NAMES[kind] = tuple(a for a in dir(node) if a.startswith("_saved_") or a == "saved_tensors")
    return names


def graph_bytes(*tensors) -> int:
    """Bytes of the distinct storages that the autograd graphs behind `tensors` hold for their backward
    (their saved tensors, the tensors themselves included): what keeping them costs."""
    storages, seen = {}, set()

    def count(value):
        if isinstance(value, torch.Tensor):
            if value.layout == torch.strided and value.device.type != "meta":
                storage = value.untyped_storage()
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                count(item)

    stack = []
    for tensor in tensors:
        if tensor is not None:
            count(tensor)
            stack.append(tensor.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in _saved_names(node):
            try:
                count(getattr(node, name))
            except (RuntimeError, AttributeError):  # freed, or not a tensor attribute after all
                pass
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return sum(storages.values())


class KeptStep:
    """One step's network graph, kept from the forward so the adjoint needs no recompute.

    x: the leaf x_k; score and guidance: with their graphs (guidance None without the lam H term);
    drift_guidance: the guidance the step drifts with, when it is not `guidance` itself (`record_exact`).
    """

    __slots__ = ("x", "score", "guidance", "drift_guidance", "used")

    def __init__(self, x, score, guidance, drift_guidance=None):
        self.x, self.score, self.guidance, self.drift_guidance = x, score, guidance, drift_guidance
        self.used = False  # the graph is freed by its one backward; a second backward recomputes

    @classmethod
    def record(cls, x, t, nets, lam, with_hessian):
        """memory='fast': the step drifts with the create_graph guidance (its rounding may differ from a
        recomputed step's, see networks.kept_drift_terms)."""
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            score, guidance = nets.drift_terms(leaf, t, lam, create_graph=with_hessian)
        return cls(leaf, score, guidance)

    @classmethod
    def record_exact(cls, x, t, nets, lam, with_hessian):
        """A memory budget's kept step: it drifts bitwise as a recomputed one (memory='lean') does."""
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            score, value, graph = nets.kept_drift_terms(leaf, t, lam, with_hessian)
        return cls(leaf, score, graph, value)

    def drift_terms(self):
        guidance = self.guidance if self.drift_guidance is None else self.drift_guidance
        return self.score.detach(), None if guidance is None else guidance.detach()

    def graph_bytes(self) -> int:
        return graph_bytes(self.x, self.score, self.guidance)

    def vjp(self, a, lam, with_hessian):
        """J_s^T a (+ lam H a) through the kept graph, which this frees (`used`: a second backward recomputes)."""
        guidance = self.guidance if with_hessian else None
        with torch.enable_grad():  # backward passes run under no_grad
            vjp = vjp_from_graph(self.score, guidance, self.x, a, lam)
        self.used = True
        return vjp


class BudgetDrift:
    """A solve drift that keeps step graphs while they fit `budget` bytes and stores the states of the
    other steps (`steps[k]`: a KeptStep or the state x_k).  Step 0's graph is measured and the plan made
    from it (`plan_kept_steps`); `kept` and `step_bytes` say what was decided."""

    def __init__(self, nets, lam: float, with_hessian: bool, n_steps: int, budget: int | None):
        self.nets, self.lam, self.with_hessian, self.n_steps, self.budget = nets, lam, with_hessian, n_steps, budget
        self.steps: list = []
        # how many first steps keep their graphs: every one ('fast'), none ('lean'), or planned at step 0 (None)
        self.kept = n_steps if budget is None else 0 if budget == 0 else None
        self.step_bytes = None
        # memory='fast' (no budget) keeps today's create_graph drift; a finite budget drifts as 'lean' does
        self.record = KeptStep.record if budget is None else KeptStep.record_exact

    def __call__(self, k, t, x):
        if self.kept is None or k < self.kept:
            step = self.record(x, t, self.nets, self.lam, self.with_hessian)
            if self.kept is None:  # step 0: measure its graph, plan the rest
                self.step_bytes = step.graph_bytes()
                self.kept = plan_kept_steps(self.n_steps, self.step_bytes, x.numel() * x.element_size(), self.budget)
            self.steps.append(step if k < self.kept else x)
            return step.drift_terms()
        self.steps.append(x)
        return self.nets.drift_terms(x, t, self.lam)


class Recompute:
    """Step VJPs from the stored states x_k, recomputing one step's graph at a time (memory='lean')."""

    def __init__(self, states, nets, config: PurifyConfig, with_hessian: bool):
        self.states, self.nets, self.config, self.with_hessian = states, nets, config, with_hessian

    def vjp(self, k: int, a):
        return self.nets.vjp(self.states[k], a, self.config.grid.t(k), self.config.lam, self.with_hessian)


class KeptGraphs:
    """Step VJPs through the graphs kept by the forward, recomputing the rest: `steps[k]` is a KeptStep or
    the state x_k; a graph already used by an earlier backward (retain_graph=True) is recomputed too."""

    def __init__(self, steps: list, nets, config: PurifyConfig, with_hessian: bool):
        self.steps, self.nets, self.config, self.with_hessian = steps, nets, config, with_hessian

    def vjp(self, k: int, a):
        step = self.steps[k]
        if isinstance(step, KeptStep):
            if not step.used:
                return step.vjp(a, self.config.lam, self.with_hessian)
            step = step.x
        return self.nets.vjp(step, a, self.config.grid.t(k), self.config.lam, self.with_hessian)


def adjoint_solve(step_vjps, a, config: PurifyConfig, first_steps: int | None = None, cotangents=None):
    """The discrete adjoint: from a = dL/dx_N walk k = N-1 .. 0 with `step_vjps.vjp(k, a)`; returns
    dL/dx_0 (or the adjoint after the first `first_steps` backward steps, for a CUDA-graph warm-up).

    cotangents: {k: dL/dx_k}, the gradients a loss of the intermediate states sends to x_k directly
    (k in 0 .. N; docs/design.md §3, per-step losses); each is added to a_k as the walk reaches step k."""
    grid = config.grid
    cotangents = cotangents or {}
    last = grid.n_steps - 1
    stop = -1 if first_steps is None else max(last - first_steps, -1)
    if grid.n_steps in cotangents:
        a = a + cotangents[grid.n_steps]
    for k in range(last, stop, -1):
        vjp = step_vjps.vjp(k, a)
        if vjp.dtype != a.dtype:
            vjp = vjp.to(a.dtype)
        a = ops.adjoint_update(a, vjp, grid.beta_dt(k))
        if k in cotangents:
            a = a + cotangents[k]
    return a


def _state(steps: list, out, k: int):
    """x_k of a solve whose forward recorded `steps` (x_k or a KeptStep for k < N) and ended at `out` (x_N)."""
    if k == len(steps):
        return out
    step = steps[k]
    return step.x.detach() if isinstance(step, KeptStep) else step


class ExactSolve(torch.autograd.Function):
    """Forward: the solve.  Backward: the discrete adjoint, walking k = N-1 .. 0.

    budget: the bytes the kept step graphs may take (`memory_budget`): 0 keeps only x_0 .. x_{N-1}
    (saved for backward) and recomputes one step's graph at a time (memory='lean'); None keeps every
    step's graph (memory='fast': N steps of activations, no recompute); in between, step graphs are
    kept while they fit and the other steps recomputed (`BudgetDrift`).  with_hessian=False is the
    detached-guidance gradient.  ctx.kept_steps / ctx.step_bytes say what the forward kept.
    """

    @staticmethod
    def forward(ctx, x, nets, config, stream, with_hessian, budget, states=()):
        drift = BudgetDrift(nets, config.lam, with_hessian, config.grid.n_steps, budget)
        with torch.no_grad():
            out = solve(x, config, stream, drift)
        steps = drift.steps
        ctx.kept_steps, ctx.step_bytes = drift.kept, drift.step_bytes
        # the stored states go through save_for_backward (version-checked); the kept graphs hold their own
        ctx.save_for_backward(*[s for s in steps if not isinstance(s, KeptStep)])
        ctx.steps = [s if isinstance(s, KeptStep) else None for s in steps]
        ctx.nets, ctx.config, ctx.with_hessian, ctx.states = nets, config, with_hessian, tuple(states)
        if not states:
            return out
        return out, torch.stack([_state(steps, out, k) for k in states])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_states=None):
        states = ctx.saved_tensors  # unpack once: each access of saved_tensors unpacks (and version-checks) all
        if ctx.kept_steps == 0:
            step_vjps = Recompute(states, ctx.nets, ctx.config, ctx.with_hessian)
        else:
            stored = iter(states)
            steps = [s if s is not None else next(stored) for s in ctx.steps]
            step_vjps = KeptGraphs(steps, ctx.nets, ctx.config, ctx.with_hessian)
        cotangents = dict(zip(ctx.states, grad_states)) if ctx.states else None
        grad = adjoint_solve(step_vjps, grad_out.contiguous(), ctx.config, cotangents=cotangents)
        return grad, None, None, None, None, None, None


def exact_solve(x, nets, config: PurifyConfig, stream, with_hessian: bool = True, memory="auto", states=()):
    """x_N of the solve from state x, differentiable in x by the discrete adjoint (a plain no-grad solve
    when no gradient is needed).  memory: see `memory_budget`.

    states: step indices k in 0 .. N (x_0 = x, x_N the result): then returns (x_N, the states x_k stacked,
    (len(states), *x.shape)), each differentiable in x: the adjoint adds the gradient a loss sends to x_k at
    step k (docs/design.md §3, per-step losses)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            if not states:
                return solve(x, config, stream, plain_drift(nets, config.lam))
            wanted, seen = set(states), {0: x}

            def keep(step):  # only the states asked for: memory stays len(states) states
                if step["k"] + 1 in wanted:
                    seen[step["k"] + 1] = step["x"]

            out = solve(x, config, stream, plain_drift(nets, config.lam), callback=keep)
            return out, torch.stack([seen[k] for k in states])
    return ExactSolve.apply(x, nets, config, stream, with_hessian, memory_budget(memory, x.device), tuple(states))

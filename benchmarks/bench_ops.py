"""Micro-benchmarks of the fused ops against their pure-torch twins (pytest-benchmark).

    pytest benchmarks/bench_ops.py --benchmark-group-by=param:size --benchmark-columns=median,ops

Fast provider on the current device: what coup_fast.ops dispatches to (the C++ ops on the CPU, the
Triton kernels on a GPU, the extension's CUDA kernel for adjoint_update when built; extra_info['backend']
names it); on a GPU adjoint_update also gets a 'triton' provider, to compare the two kernels.  On a GPU,
extra_info carries the
effective bandwidth in GB/s (bytes each op must read and write / median time, host launch included)
and, for the fused ops, 'GB/s kernel': the same bytes over the device time of the kernel alone
(20 calls captured in a CUDA graph, timed with events), to compare with the HBM bandwidth.
"""
import pytest
import torch

from coup_fast import guidance, noise, ops, sde
from coup_fast.kernels import available as triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"B1_cifar": (1, 3, 32, 32), "B64_cifar": (64, 3, 32, 32)}
if DEVICE == "cuda":  # 50 MB per tensor: large enough for GB/s to measure the memory, not the launch
    SIZES["B4096_cifar"] = (4096, 3, 32, 32)
CLASSES = {"B64_C10": (64, 10), "B64_C1000": (64, 1000)}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, bytes_moved, capturable=False):
    def call():
        fn()
        _sync()

    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    benchmark.extra_info["backend"] = ops.backend(DEVICE)
    benchmark(call)
    if DEVICE == "cuda" and benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(bytes_moved / benchmark.stats.stats.median / 1e9, 1)
        if capturable:  # the kernel alone: host launch cost (Python, custom-op dispatch) taken out
            benchmark.extra_info["GB/s kernel"] = round(bytes_moved / _graph_seconds(fn) / 1e9, 1)


def _graph_seconds(fn, calls: int = 20, replays: int = 5) -> float:
    """Device time of one fn() call: `calls` calls captured in one CUDA graph, timed over replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (calls * replays)


def _em_twin(x, s, g, seed, step):
    z = noise.philox_normal(seed, step, x.shape, dtype=x.dtype, device=x.device)
    return sde.euler_maruyama_step(x, s, g, 0.02, 1.0, z)


@pytest.mark.parametrize("provider", ["torch", "fast"])
@pytest.mark.parametrize("size", list(SIZES))
def test_em_step(benchmark, provider, size):
    benchmark.group = f"em_step {size}"
    x, s, g = (torch.randn(SIZES[size], device=DEVICE) for _ in range(3))
    rng = torch.tensor([12345, 7], device=DEVICE)
    # the twin takes the counters as Python ints: reading them from the device tensor would add a sync
    fn = (lambda: _em_twin(x, s, g, 12345, 7)) if provider == "torch" else (lambda: ops.em_step(x, s, g, rng, 0.02, 1.0))
    _run(benchmark, fn, 4 * x.numel() * 4, capturable=provider == "fast")  # read x, s, g; write x_{k+1}


@pytest.mark.parametrize("provider", ["torch", "fast", "triton"])
@pytest.mark.parametrize("size", list(SIZES))
def test_adjoint_update(benchmark, provider, size):
    if provider == "triton" and not (DEVICE == "cuda" and triton_available()):
        pytest.skip("the Triton adjoint kernel: needs a GPU and triton")
    benchmark.group = f"adjoint_update {size}"
    a, v = (torch.randn(SIZES[size], device=DEVICE) for _ in range(2))
    if provider == "triton":  # the kernel's launcher itself (coup_fast.ops chooses the extension's here)
        from coup_fast.kernels.adjoint_update import adjoint_update as triton_adjoint_update
    fn = {"torch": lambda: sde.adjoint_step(a, v, 0.02), "fast": lambda: ops.adjoint_update(a, v, 0.02),
          "triton": lambda: triton_adjoint_update(a, v, 0.02)}[provider]
    benchmark.extra_info["adjoint_backend"] = ops.backend(DEVICE, "adjoint_update") if provider == "fast" else provider
    _run(benchmark, fn, 3 * a.numel() * 4, capturable=provider != "torch")


@pytest.mark.parametrize("provider", ["torch", "fast"])
@pytest.mark.parametrize("size", list(CLASSES))
def test_confidence_grad_and_hvp(benchmark, provider, size):
    """Forward, gradient (create_graph) and one Hessian-vector product: the exact adjoint's use."""
    if provider == "fast" and DEVICE != "cuda":
        pytest.skip("the fused confidence op runs on CUDA (CPU uses the torch twin)")
    benchmark.group = f"confidence {size}"
    fn_conf = guidance.log_max_softmax if provider == "torch" else ops.log_confidence
    logits = torch.randn(CLASSES[size], device=DEVICE, requires_grad=True)
    w = torch.randn_like(logits)

    def fn():
        (grad,) = torch.autograd.grad(fn_conf(logits).sum(), logits, create_graph=True)
        return torch.autograd.grad((grad * w).sum(), logits)

    _run(benchmark, fn, 5 * logits.numel() * 4)

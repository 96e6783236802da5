"""One timing harness for the benchmarks: reference and fast provider side by side, device named.

Peak memory is the peak resident set size during one call of the measured function minus the
resident size just before it, after the models and inputs exist, measured in a fresh child process
per case (bench_cpu_purify) or in the running one after returning the heap's free pages to the
system (`trim_heap`, glibc's malloc_trim: memory freed by earlier calls would otherwise be reused
without showing as growth).  The kernel's peak mark is reset before the call (Linux
/proc/self/clear_refs), so an earlier, larger peak (compiling, loading) cannot hide the call's.  That
counts everything the call makes resident (tensors, autograd graphs, allocator and glibc caches), at
page granularity; it is what a user's process pays.  On CUDA, `cuda_peak_growth` reads torch's
allocator instead.
"""
from __future__ import annotations

import ctypes
import gc
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, torch threads {torch.get_num_threads()}"


def sync(device: str = "cpu"):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, *, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> float:
    """Fastest wall time of fn() in seconds (the minimum: on a shared machine, the least disturbed run)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_round_robin(fns: dict, *, repeats: int = 2, device: str = "cpu", first: dict | None = None) -> dict:
    """Fastest wall time (s) of each fn, calling them interleaved: one warm-up round, then `repeats` rounds.
    first: a dict to receive each fn's warm-up time (its first call: compiling, capturing)."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - start)
            elif first is not None:
                first[name] = time.perf_counter() - start
    return best


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark (VmHWM) and return the resident bytes now; None where the
    mark cannot be reset (not Linux), so only the lifetime peak (ru_maxrss) is known."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """Peak resident bytes since the last reset_peak_rss (the lifetime peak where it cannot reset)."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return maxrss_bytes()


def trim_heap() -> bool:
    """Collect garbage and hand the C heap's free pages back to the system (glibc malloc_trim), so that a
    call measured next in this process shows its memory as growth.  False where there is no malloc_trim."""
    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def peak_growth(fn, *, trim: bool = False) -> int:
    """Bytes by which one call of fn() raises the resident set above its size before the call
    (trim: `trim_heap` first, for a measurement in a process that has run other calls)."""
    if trim:
        trim_heap()
    before = reset_peak_rss()
    if before is None:  # growth of the lifetime peak: right only if nothing earlier peaked higher
        before = maxrss_bytes()
    fn()
    return peak_rss_bytes() - before


def cuda_peak_growth(fn) -> int:
    """Bytes by which one call of fn() raises torch's CUDA allocation above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_child(module: str, case: dict, timeout: float = 1200) -> dict:
    """Run `python -m module --case JSON` and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-m", module, "--case", json.dumps(case)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table; columns are (key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


class _RecordConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def recorded_convolutions(step) -> list:
    """The aten convolution calls (forward and backward) that step() makes, with their arguments: replaying
    them (`replay`) times the convolution kernels alone, the floor of any engine that keeps torch's convolutions."""
    with _RecordConvolutions() as rec:
        step()
    return rec.calls


def replay(calls):
    for func, args, kwargs in calls:
        func(*args, **kwargs)

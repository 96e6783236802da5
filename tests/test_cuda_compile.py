"""Compile-only checks of the CUDA sources with the machine's nvcc (nothing runs on a GPU here).

1. csrc/coup_math.h under nvcc: a test translation unit instantiates the device maths in a
   kernel and runs the same __host__ __device__ functions on the host, compared with noise.py.
2. The whole csrc/cuda/coup_ops.cu against torch's headers (slow: ~1-2 min on 2 cores; set
   COUP_FAST_QUICK_TESTS=1 to skip it).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from coup_fast import noise, sde

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ
                                 else None)
pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (PATH, CUDA_HOME)")
ARCH = "-arch=sm_80"
# The C++ standard torch.utils.cpp_extension builds extensions with: C++20 from torch 2.12 on (2.14's
# headers refuse anything older), C++17 before.
TORCH_CXX_STD = "-std=c++20" if torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) >= (2, 12) \
    else "-std=c++17"

PROBE = r"""
#include <cstdio>
#include "coup_math.h"
using namespace coup_fast;

__global__ void probe_kernel(const long long* rng, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float z = philox_normal<float>(rng[0], rng[1] * n + i);
  out[i] = adjoint_update<float>(em_update<float>(0.5f, 0.1f, 0.2f, z, 0.02f, 1.5f, 0.1414f), 0.3f, 0.02f);
}

int main() {  // the same maths on the host: z for (seed, k) = (SEED, K), then one step and one adjoint update
  for (int i = 0; i < 5; ++i) std::printf("%.17g\n", philox_normal<double>(SEED, (unsigned long long)K * 5 + i));
  std::printf("%.17g\n", em_update<double>(0.5, 0.1, 0.2, 1.25, 0.02, 1.5, 0.1414213562373095));
  std::printf("%.17g\n", adjoint_update<double>(0.7, 0.3, 0.02));
  return 0;
}
"""


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_device_maths_compile_and_match_noise_py(tmp_path):
    seed, k = 123456789012345, 50_000_000  # counters past 2^32: the high word matters
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    exe = tmp_path / "probe"
    _run([NVCC, "-std=c++17", ARCH, f"-DSEED={seed}ULL", f"-DK={k}", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
         tmp_path)
    values = [float(v) for v in _run([str(exe)], tmp_path).split()]
    torch.testing.assert_close(torch.tensor(values[:5], dtype=torch.float64),
                               noise.philox_normal(seed, k, (5,), dtype=torch.float64), rtol=0, atol=1e-12)
    want_step = sde.euler_maruyama_step(0.5, 0.1, 0.2, 0.02, 1.5, 1.25)
    assert abs(values[5] - want_step) < 1e-6  # sqrt(0.02) given to 16 digits above
    assert abs(values[6] - sde.adjoint_step(0.7, 0.3, 0.02)) < 1e-15


def _torch_cuda_includes(tmp_path):
    """torch's include dirs, plus a stand-in for the one header a CPU-only wheel does not ship."""
    from torch.utils.cpp_extension import include_paths

    dirs = list(include_paths())
    generated = "c10/cuda/impl/cuda_cmake_macros.h"  # written by torch's CMake at build time
    if not any((Path(d) / generated).exists() for d in dirs):
        shim = tmp_path / "shim"
        (shim / generated).parent.mkdir(parents=True)
        (shim / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(shim))
    missing = [h for h in ("ATen/ATen.h", "c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h", "torch/library.h")
               if not any((Path(d) / h).exists() for d in dirs)]
    return dirs, missing


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COUP_FAST_QUICK_TESTS") == "1", reason="COUP_FAST_QUICK_TESTS=1: slow full compile")
def test_coup_ops_cu_compiles(tmp_path):
    dirs, missing = _torch_cuda_includes(tmp_path)
    if missing:
        pytest.skip(f"torch headers absent from this install: {missing}")
    flags = ["-c", TORCH_CXX_STD, "-O0", ARCH, "--expt-relaxed-constexpr", "-w", "-DTORCH_EXTENSION_NAME=coup_check"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    out = tmp_path / "coup_ops.o"
    src = ROOT / "csrc" / "cuda" / "coup_ops.cu"
    _run([NVCC, *flags, *[f"-I{d}" for d in dirs], str(src), "-o", str(out)], tmp_path)
    assert out.stat().st_size > 0

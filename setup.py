"""Builds coup_fast._C against the torch that is installed (install with --no-build-isolation).

A CPU-only torch builds the CPU ops; a CUDA torch with nvcc also builds csrc/cuda/*.cu (on a machine
without a visible GPU only when TORCH_CUDA_ARCH_LIST names the target architectures).
COUP_FAST_NO_EXT=1 skips the extension (coup_fast then runs on its pure-torch ops).
"""
import glob
import os

from setuptools import setup

try:  # torch is absent under pip's build isolation: build nothing, coup_fast compiles at first use
    import torch
except ImportError:
    torch = None

ext_modules, cmdclass = [], {}
if torch is not None and os.environ.get("COUP_FAST_NO_EXT") != "1":
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/coup_ops.cpp"]
    cxx = ["-O3", "-fopenmp"]  # no -std: BuildExtension adds the one this torch's headers need (C++20 from 2.12)
    # Without a visible GPU the CUDA ops are built only on request, TORCH_CUDA_ARCH_LIST naming the
    # targets (e.g. "8.0;9.0"): there is no GPU to read the architecture from, and a GPU-less machine
    # with a CUDA torch and nvcc often lacks the CUDA runtime library to link against.
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("COUP_FAST_CPU_ONLY") != "1"
                and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension("coup_fast._C", sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("coup_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

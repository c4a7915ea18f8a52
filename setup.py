"""Build script for icd: the Python package, the Triton kernels and the C++/CUDA extension.

The extension ``icd._C`` always contains the C++ CPU kernels of ``csrc/cpu``. The CUDA
kernels of ``csrc/cuda`` are compiled into the same library when a CUDA build of torch and
nvcc are both present, or when ``FORCE_CUDA=1``; ``ICD_NO_CUDA=1`` turns them off.
``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (A100, H100) when unset.

Build with ``pip install --no-build-isolation .`` (or ``-e .``): torch is a build
dependency, and build isolation would download a second copy of it.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# compile times, longest first (nvcc 13.0, sm_80 + sm_90: about 4 : 3 : 2 : 1)
LONGEST_CUDA_UNITS = [
    "csrc/cuda/instance_attention.cu",
    "csrc/cuda/tensor_core_attention.cu",
    "csrc/cuda/value_mask.cu",
    "csrc/cuda/feature_mse.cu",
]


def _cuda_wanted() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("ICD_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    return os.path.exists(nvcc) or shutil.which("nvcc") is not None


def _extensions() -> tuple[list, dict]:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]  # torch adds the C++ standard it was built with
    define_macros: list[tuple[str, str | None]] = []
    extra = {"cxx": cxx_flags}
    with_cuda = _cuda_wanted()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # ninja starts the jobs in this order: the CUDA units first (compiled once per
        # architecture), the longest first (measured), so no core idles at the end
        cuda = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        cuda.sort(key=lambda p: LONGEST_CUDA_UNITS.index(p) if p in LONGEST_CUDA_UNITS else len(LONGEST_CUDA_UNITS))
        sources = cuda + sources
        define_macros.append(("ICD_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    ext = ext_cls(
        name="icd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["icd", "icd.*"]) + ["icd.kernels"],
    package_dir={"icd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

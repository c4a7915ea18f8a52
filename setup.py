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
# the longest units first (seconds of one core, nvcc 13.0, sm_80 + sm_90, measured from ninja's
# log: 99, 58, 49, 34; the C++ units 7-33 each), so that with two cores none idles at the end
LONGEST_UNITS = [
    "csrc/cuda/instance_attention.cu",
    "csrc/cuda/tensor_core_attention.cu",
    "csrc/cuda/value_mask.cu",
    "csrc/cuda/feature_mse.cu",
    "csrc/cpu/tensor_core_emulation.cpp",
]


def _longest_first(path: str) -> int:
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return LONGEST_UNITS.index(rel) if rel in LONGEST_UNITS else len(LONGEST_UNITS)


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
        sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp") + sources
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

    class LongestFirst(BuildExtension):
        """torch's ninja build, given the sources longest first: setuptools sorts them by name and
        ninja starts its jobs in the order it is given them."""

        def build_extension(self, ext) -> None:
            compile_sources = self.compiler.compile  # torch's ninja wrapper, set by build_extensions

            def compile_longest_first(sources, *args, **kwargs):
                return compile_sources(sorted(sources, key=_longest_first), *args, **kwargs)

            self.compiler.compile = compile_longest_first
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_sources

    return [ext], {"build_ext": LongestFirst.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["icd", "icd.*"]) + ["icd.kernels"],
    package_dir={"icd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

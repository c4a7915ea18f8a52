"""The trainer's speed settings: the autocast type and its GradScaler, torch.compile, CUDA graphs.

``icd train --amp [--amp-dtype bfloat16|float16] [--compile [--compile-backend B]] [--icd-cuda-graphs]``;
each combination that cannot run is refused here with one line, before any model is built.
"""

from __future__ import annotations

import argparse
import shutil
import sys

import torch
from torch import nn

from icd.errors import ConfigError

AMP_DTYPES = ("bfloat16", "float16")
# inductor generates code (C++ on CPU, Triton on CUDA); aot_eager traces forward and backward
# without generating any (a check of the compiled paths on a machine without a compiler)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def amp_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """The autocast type of ``--amp-dtype name`` (None: float16 on CUDA, bfloat16 elsewhere)."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if name not in AMP_DTYPES:
        raise ConfigError(f"--amp-dtype {name}: expected one of {', '.join(AMP_DTYPES)}")
    return getattr(torch, name)


def grad_scaler(device: torch.device, amp: bool, name: str | None) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 autocast (CUDA or CPU); None for float32 and bfloat16, whose
    exponent range needs no loss scaling."""
    if not amp or amp_dtype(device, name) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def compile_unavailable(device: torch.device, backend: str) -> str | None:
    """Why ``torch.compile(backend=backend)`` cannot run on ``device`` here (None when it can)."""
    if not torch._dynamo.is_dynamo_supported():
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"torch.compile does not support Python {python} in torch {torch.__version__}"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton on CUDA, and Triton is not installed (or finds no GPU)"
    elif not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return "inductor needs a C++ compiler on the CPU (c++, g++ or clang++ on PATH) and none was found"
    return None


def check_speed_flags(args: argparse.Namespace, device: torch.device) -> None:
    """ConfigError for --compile, --icd-cuda-graphs and --amp-dtype settings that cannot run."""
    if getattr(args, "amp_dtype", None) is not None and not args.amp:
        raise ConfigError(f"--amp-dtype {args.amp_dtype}: needs --amp (without it the run is in float32)")
    backend = getattr(args, "compile_backend", None)
    if backend is not None and not getattr(args, "compile", False):
        raise ConfigError(f"--compile-backend {backend}: needs --compile")
    if getattr(args, "compile", False):
        backend = backend or "inductor"
        reason = compile_unavailable(device, backend)
        if reason is not None:
            raise ConfigError(
                f"--compile (--compile-backend {backend})",
                f"{reason}; leave --compile out (or try --compile-backend aot_eager)",
            )
    if getattr(args, "icd_cuda_graphs", False):
        if device.type != "cuda":
            raise ConfigError(f"--icd-cuda-graphs: CUDA graphs need a CUDA --device; this run is on {device}")
        if args.distill != "icd":
            raise ConfigError(f"--icd-cuda-graphs: graphs ICD's distiller; --distill is {args.distill}")
        if not args.icd_static_shapes:
            raise ConfigError(
                "--icd-cuda-graphs: needs --icd-static-shapes (a graph replays fixed shapes; the default "
                "layout's shapes follow each batch's box counts)"
            )
        reason = compile_unavailable(device, "inductor")
        if reason is not None:
            raise ConfigError(f"--icd-cuda-graphs: {reason}")


def compile_in_place(
    modules: list[nn.Module], backend: str, mode: str | None = None, dynamic: bool | None = None
) -> None:
    """``module.compile(...)`` for each module: compiled on its first call, its state dict keys and
    hooks unchanged (unlike ``torch.compile(module)``, which wraps it)."""
    if mode == "reduce-overhead":
        import torch._inductor.config as inductor_config

        # ICD's level shapes are small CPU tensors in its graph: without partitioning inductor
        # skips CUDA graphs for a graph with any CPU node (the default from some torch 2.x on)
        if hasattr(inductor_config, "graph_partition"):
            inductor_config.graph_partition = True
    for module in modules:
        module.compile(backend=backend, mode=mode, dynamic=dynamic)


def compile_error(err: Exception, backend: str) -> ConfigError | None:
    """The one-line error for a failure of torch.compile's code generation (None for other errors)."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:  # pragma: no cover - every torch with torch.compile has it
        return None
    if not isinstance(err, BackendCompilerFailed):
        return None
    inner = getattr(err, "inner_exception", None) or err
    text = str(inner).strip()
    first = f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__
    return ConfigError(
        f"--compile (--compile-backend {backend})",
        f"torch.compile failed to compile the model: {first}; run without --compile (or with "
        "--compile-backend aot_eager)",
    )

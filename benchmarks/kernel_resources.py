"""Registers, spills and shared memory of the icd Triton kernels, compiled ahead of time for
an NVIDIA GPU architecture on a machine without one (Triton's compiler and ptxas run on the
CPU; cuobjdump from the CUDA toolkit reads the cubin's resource usage).

    python benchmarks/kernel_resources.py                  # sm_90, the ICD shape's kernels
    python benchmarks/kernel_resources.py --arch 80 --dtype float16

One line per kernel and config: registers per thread, spill stores and loads (bytes),
shared memory (bytes), warps, and the programs per multiprocessor the occupancy rules allow
(what icd.kernels.tuning.resident_programs computes from the loaded kernel on a GPU). A
config that spills is one to drop from the backward's rule (tuning.BACKWARD_RULE).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret

import torch  # noqa: E402
from icd.kernels.offline import offline_target  # noqa: E402

# The ICD shape's launch arguments that decide the compiled code (strides only matter through
# Triton's specialisation: == 1 or a multiple of 16).
N, H, K, S, D = 2, 8, 300, 22_400, 32
REGISTERS_PER_SM = 65_536
THREADS_PER_SM = 2_048
SHARED_PER_SM = {80: 167_936, 86: 102_400, 89: 102_400, 90: 233_472}


def _triton_nvidia_dir() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.dirname(nvidia.__file__)


def _resources(compiled, arch: int) -> dict[str, int]:
    cuobjdump = shutil.which("cuobjdump") or os.path.join(_triton_nvidia_dir(), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    regs, stack, _ = (int(x) for x in found.groups())
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    per_warp = math.ceil(regs * 32 / 256) * 256
    resident = min(
        REGISTERS_PER_SM // (per_warp * num_warps),
        THREADS_PER_SM // (32 * num_warps),
        SHARED_PER_SM.get(arch, 102_400) // (shared + 1024) if shared else 32,
    )
    return {"regs": regs, "stack": stack, "shared": shared, "warps": num_warps, "resident": resident}


def _report(name: str, compiled, arch: int) -> None:
    r = _resources(compiled, arch)
    print(f"{name:60s} regs {r['regs']:3d}  stack {r['stack']:5d}  shared {r['shared']:6d}  "
          f"warps {r['warps']:2d}  programs/SM {r['resident']}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80, 86, 89, 90)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--k", type=int, default=K, help="instance slots (the backward's resident set)")
    parser.add_argument("--head-dim", type=int, default=D)
    parser.add_argument("--only", choices=("backward", "forward", "value_mask", "mse"), help="one kernel family")
    parser.add_argument("--backward-configs",
                        help="BLOCK_M:BLOCK_N:warps:stages,... instead of tuning.BACKWARD_CONFIGS")
    args = parser.parse_args(argv)
    with offline_target(args.arch):
        _report_all(args)
    return 0


def _report_all(args: argparse.Namespace) -> None:
    from icd.kernels import feature_mse, instance_attention, tuning, value_mask

    dtype = getattr(torch, args.dtype)
    d, kq = args.head_dim, args.k
    bd = tuning.block_d(d)
    precision = tuning.dot_precision(dtype)
    f32, u8 = torch.float32, torch.uint8
    k_strides = (H * D, D, N * H * D, 1)  # [S, N, h, D] viewed as [N, h, S, D]
    q_strides = (H * kq * d, kq * d, d, 1)

    ints = (*q_strides, *k_strides, *k_strides, *q_strides, *q_strides, H * kq, kq, 1,
            *q_strides, *k_strides, *k_strides, H, kq, S, d, 0.17, 0.25, 8)
    configs = tuning.BACKWARD_CONFIGS
    if args.backward_configs:
        configs = [tuple(int(x) for x in c.split(":")) for c in args.backward_configs.split(",")]
    chosen = tuning.backward_config(kq)
    for block_m, block_n, warps, stages in configs if args.only in (None, "backward") else ():
        blocks, chunked = tuning.query_blocks(kq, block_m)
        compiled = instance_attention._backward_kernel.warmup(
            dtype, dtype, dtype, u8, dtype, dtype, f32, f32, dtype, dtype, dtype, f32, f32, f32, *ints,
            grid=(1,), HAS_MASK=True, HAS_GRAD_LSE=True, DQ_PARTIAL=True, CHUNKED=chunked,
            DOT_PRECISION=precision, BLOCK_D=bd, BLOCK_M=block_m, QUERY_BLOCKS=blocks, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages,
        )
        mark = " <- rule" if (block_m, block_n, warps, stages) == chosen else ""
        _report(f"backward {blocks}x{block_m} queries, BLOCK_N={block_n} w{warps} s{stages}{mark}", compiled,
                args.arch)

    split = instance_attention._forward_split_kernel.fn
    for config in tuning.GPU_CONFIGS["split"] if args.only in (None, "forward") else ():
        for with_values, compact in ((True, False), (False, True)):
            compiled = split.warmup(
                dtype, dtype, dtype, u8, f32, f32, f32, f32, dtype, f32,
                *q_strides, *k_strides, *k_strides, H, kq, S, d, 0.25, 8, 1,
                grid=(1,), HAS_MASK=True, WITH_VALUES=with_values, COMPACT=compact, FINAL=False,
                DOT_PRECISION=precision, BLOCK_D=bd, **config.kwargs,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )
            what = "forward" if with_values else "statistics (compact)"
            _report(f"{what} {config.kwargs} w{config.num_warps} s{config.num_stages}", compiled, args.arch)

    mask_kernel = value_mask._value_mask_kernel.fn
    for config in tuning.GPU_CONFIGS["key_block"] if args.only in (None, "value_mask") else ():
        compiled = mask_kernel.warmup(
            dtype, dtype, u8, f32, f32, f32, f32, f32, *q_strides, *k_strides, H, kq, S, d, 0.25, 22, 1,
            grid=(1,), HAS_MASK=True, FROM_PARTS=True, DOT_PRECISION=precision, BLOCK_D=bd, **config.kwargs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        _report(f"value mask {config.kwargs} w{config.num_warps} s{config.num_stages}", compiled, args.arch)

    for config in tuning.GPU_CONFIGS["mse"] if args.only in (None, "mse") else ():
        for kernel, name in ((feature_mse._mse_forward_kernel.fn, "mse forward"),
                             (feature_mse._mse_backward_kernel.fn, "mse backward")):
            if name == "mse forward":
                compiled = kernel.warmup(
                    dtype, dtype, f32, f32, f32, *k_strides, *k_strides, H, S, d, 1e-5, 4, 1,
                    grid=(1,), NORM_STUDENT=True, NORM_TEACHER=True, BLOCK_D=bd, **config.kwargs,
                    num_warps=config.num_warps, num_stages=config.num_stages,
                )
            else:
                compiled = kernel.warmup(
                    dtype, dtype, f32, f32, f32, dtype, *k_strides, *k_strides, *k_strides,
                    H, N * H, S, d, 1e-5, 1e-6, 4, 1,
                    grid=(1,), PER_HEAD=True, NORM_STUDENT=True, NORM_TEACHER=True, BLOCK_D=bd,
                    BLOCK_P=64, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                )
            _report(f"{name} {config.kwargs} w{config.num_warps} s{config.num_stages}", compiled, args.arch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

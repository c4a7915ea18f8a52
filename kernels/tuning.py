"""Launch choices shared by the icd Triton kernels: autotune configs, buckets, grid sizes.

Under ``TRITON_INTERPRET=1`` (CPU tensors, how CI runs the kernels) every kernel gets ONE
small config, since autotuning an interpreted kernel would run it once per config, and the
split counts assume a pretend 2-multiprocessor device so that small test shapes still cross
every code path (several splits, several blocks).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programs per multiprocessor that a split grid aims for (latency hiding on H100-class GPUs).
PROGRAMS_PER_SM = 4
# A split of the keys is never shorter than this many keys (the partial results cost a write).
MIN_KEYS_PER_SPLIT = 32 if INTERPRETED else 1024
# The query block assumed when sizing a split grid (the autotuned one is not known yet).
ROW_BLOCK_GUESS = 16 if INTERPRETED else 64


def configs(gpu: list[tuple[dict[str, int], int, int]], interpreted: dict[str, int]) -> list:
    """triton.Config list: ``gpu`` as (block sizes, num_warps, num_stages), or the one
    ``interpreted`` config under the interpreter."""
    if INTERPRETED:
        return [triton.Config(interpreted, num_warps=1, num_stages=1)]
    return [triton.Config(blocks, num_warps=w, num_stages=s) for blocks, w, s in gpu]


def block_d(head_dim: int) -> int:
    """The padded head-dim block: a power of two >= 16 (tl.dot's smallest operand side)."""
    return max(16, triton.next_power_of_2(head_dim))


def bucket(size: int) -> int:
    """The autotune bucket of a size: the next power of two (few distinct tunings over a run)."""
    return triton.next_power_of_2(max(1, size))


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a grid should have to fill the device."""
    return PROGRAMS_PER_SM * multiprocessor_count(device)


def num_key_splits(device: torch.device, heads_total: int, num_queries: int, num_keys: int) -> int:
    """How many slices of the S keys a split-S kernel uses: enough programs to fill the device
    with the N h ceil(K / ROW_BLOCK_GUESS) query blocks, never slices under MIN_KEYS_PER_SPLIT."""
    rows = heads_total * math.ceil(num_queries / ROW_BLOCK_GUESS)
    wanted = math.ceil(target_programs(device) / rows)
    return max(1, min(wanted, math.ceil(num_keys / MIN_KEYS_PER_SPLIT)))


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU current for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision, after torch.get_float32_matmul_precision() for float32 operands.

    "highest" gets 3xTF32 (tensor cores, products exact to ~2^-22: float32 accuracy; plain
    IEEE products fall back to FMA loops that spill registers at these tile sizes), "high"
    and "medium" get one TF32 pass. Half-precision operands ignore the setting.
    """
    if INTERPRETED:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


SPLIT_CONFIGS = configs(  # one program per (key slice, query block, head)
    gpu=[
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
    ],
    interpreted={"BLOCK_M": 16, "BLOCK_N": 16},
)
KEY_BLOCK_CONFIGS = configs(  # dk/dv and the value mask: one program per key block
    gpu=[
        ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 2),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 2),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 2),
    ],
    interpreted={"BLOCK_M": 16, "BLOCK_N": 16},
)
ROW_CONFIGS = configs(  # merge / reduce kernels over [K, D] rows
    gpu=[({"BLOCK_M": 16}, 2, 1), ({"BLOCK_M": 64}, 4, 1)],
    interpreted={"BLOCK_M": 16},
)
ATTENTION_KEY = ["BLOCK_D", "S_BUCKET", "K_BUCKET"]

"""Launch choices shared by the icd Triton kernels: autotune configs and keys, shared-memory
pruning, grid sizes.

Autotuning is meant to happen once per process and kernel, in the first training step, and
never again: the keys are coarse (head-dim block, dtypes, compile-time flags and a size
class that only separates toy problems from detection-sized ones), never the number of
instances K or a bucket of the number of keys S, which change from batch to batch. Before
benchmarking, configs whose shared-memory estimate exceeds what the device grants one block
are dropped (``prune_by_shared_memory``); each family keeps a small config that fits every
supported GPU. The chosen configs are written to Triton's cache (``TRITON_CACHE_DIR``,
default ``~/.triton/cache``) where the installed Triton supports ``cache_results``, so later
processes do not benchmark again.

Under ``TRITON_INTERPRET=1`` (CPU tensors, how CI runs the kernels) every kernel gets ONE
small config, since autotuning an interpreted kernel would run it once per config, and the
split counts assume a pretend 2-multiprocessor device so that small test shapes still cross
every code path (several splits, several blocks). ``GPU_CONFIGS`` keeps the GPU lists there
too, so that tests can pin each of them in turn.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programs per multiprocessor that a split-S forward grid aims for (latency hiding).
PROGRAMS_PER_SM = 4
# ... and the feature MSE's bandwidth-bound grid-stride kernels.
MSE_PROGRAMS_PER_SM = 8
# A split of the keys is never shorter than this many keys (the partial results cost a write;
# a backward slice also reloads its head's queries, dO and out).
MIN_KEYS_PER_SPLIT = 32 if INTERPRETED else 1024
# The backward keeps the dq accumulators of up to this many query blocks of an (image, head)
# on chip (unrolled in the kernel: K <= 512 at BLOCK_M = 64); more queries are walked in
# chunks of that many blocks.
MAX_QUERY_BLOCKS = 8
# Backward programs per multiprocessor assumed under the interpreter (no compiled kernel).
INTERPRETED_RESIDENCY = 2
# The query block assumed when sizing a split grid (the autotuned one is not known yet).
ROW_BLOCK_GUESS = 16 if INTERPRETED else 64
# Problems with fewer keys than this are tuned apart from detection-sized ones (a unit test's
# tuning must not become a training run's, through the cache on disk). ICD's inputs of >= 400
# px give S >= 3,000 keys, so a training run stays on one side.
SMALL_PROBLEM_KEYS = 2048

# Shared memory one block may use, for devices whose properties cannot be read (sm_86/89).
DEFAULT_SHARED_MEMORY = 101_376


def _tiles(rows: Sequence[tuple[int, int, int, int]], names: tuple[str, str] = ("BLOCK_M", "BLOCK_N")) -> list:
    return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s) for a, b, w, s in rows]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). The last config of each list fits every GPU
# (>= 99 KiB of shared memory per block: sm_80 to sm_90) at D = 128 in float32 (see
# shared_memory_estimate): pruning never leaves a list without a config that launches.
GPU_CONFIGS: dict[str, list[triton.Config]] = {
    # forward split-S pass: one program per (key slice, query block, head)
    "split": _tiles([
        (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4),
        (128, 64, 8, 3), (16, 128, 4, 3), (32, 16, 4, 1),
    ]),
    # value mask: one program per (key block, head), looping over the compacted query blocks
    # (7-12 rows of weight > 0 per image in ICD: a 16-row block wastes least)
    "key_block": _tiles([
        (32, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 2),
        (128, 64, 8, 2), (16, 128, 4, 3), (32, 32, 4, 1),
    ]),
    # merges and reductions over [K, D] rows (no dots)
    "row": [triton.Config({"BLOCK_M": 16}, num_warps=2, num_stages=1),
            triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)],
    # feature MSE: row tiles of [BLOCK_S, D] (no dots)
    "mse": [triton.Config({"BLOCK_S": s}, num_warps=w, num_stages=st)
            for s, w, st in ((32, 4, 3), (64, 4, 3), (128, 8, 3), (64, 8, 4))],
}
INTERPRETED_BLOCKS: dict[str, dict[str, int]] = {
    "split": {"BLOCK_M": 16, "BLOCK_N": 16},
    "key_block": {"BLOCK_M": 16, "BLOCK_N": 16},
    "row": {"BLOCK_M": 16},
    "mse": {"BLOCK_S": 16},
}


def configs(family: str) -> list[triton.Config]:
    """The configs an autotuner of ``family`` starts from: the GPU list, or one small config
    under the interpreter."""
    if INTERPRETED:
        return [triton.Config(dict(INTERPRETED_BLOCKS[family]), num_warps=1, num_stages=1)]
    return list(GPU_CONFIGS[family])


# --- shared memory ---------------------------------------------------------------------------

# Tiles staged through shared memory per family, as (rows, cols, element, copies, pipelined):
# dot operands and layout changes go through shared memory, a loop's loads are multi-buffered
# num_stages times when pipelined. element "E" is the input's element size, "F" float32.
# copies is (2-byte inputs, float32 inputs): 3xTF32 dots of float32 operands stage their
# split halves too. Calibrated on Triton 3.8's ahead-of-time compiles for sm_80 and sm_90
# (no GPU needed: triton.compile with a GPUTarget): the estimate was never below the
# compiled kernel's shared memory, by a factor of 1.1 to 3.
_STAGED: dict[str, tuple[tuple[str, str, str, tuple[int, int], bool], ...]] = {
    "split": (("BLOCK_M", "BLOCK_D", "E", (1, 1), False),  # q
              ("BLOCK_N", "BLOCK_D", "E", (1, 2), True),   # k
              ("BLOCK_N", "BLOCK_D", "E", (1, 2), True),   # v
              ("BLOCK_M", "BLOCK_N", "E", (1, 2), False)),  # P as a dot operand
    "key_block": (("BLOCK_N", "BLOCK_D", "E", (1, 2), False),  # k
                  ("BLOCK_M", "BLOCK_D", "E", (1, 2), True),   # q
                  ("BLOCK_M", "BLOCK_N", "F", (1, 1), False)),  # column sums of P
}


def shared_memory_estimate(family: str, config: triton.Config, block_d: int, element_size: int) -> int:
    """Bytes of shared memory a config of ``family`` needs at head-dim block ``block_d``.

    An upper-bound model (see _STAGED) plus 4 KiB of scratch for reductions; families
    without dots need only that scratch.
    """
    sizes = {**config.kwargs, "BLOCK_D": block_d}
    total = 4096
    for rows, cols, kind, copies, pipelined in _STAGED.get(family, ()):
        nbytes = sizes[rows] * sizes[cols] * (element_size if kind == "E" else 4)
        nbytes *= copies[1] if element_size >= 4 else copies[0]
        total += nbytes * (max(1, config.num_stages) if pipelined else 1)
    return total


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may opt into on ``device``."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no such limit
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SHARED_MEMORY)


def fitting_configs(
    family: str, candidates: Sequence[triton.Config], block_d: int, element_size: int, limit: int
) -> list[triton.Config]:
    """The configs whose estimate fits ``limit``; if none does, the smallest one alone."""
    estimates = [shared_memory_estimate(family, c, block_d, element_size) for c in candidates]
    kept = [c for c, need in zip(candidates, estimates, strict=True) if need <= limit]
    if kept:
        return kept
    return [candidates[min(range(len(candidates)), key=estimates.__getitem__)]]


def prune_by_shared_memory(family: str, tensor_arg: str) -> Callable:
    """An ``early_config_prune`` for ``family``: drops the configs that do not fit the shared
    memory of the device of argument ``tensor_arg`` (whose dtype sets the element size)."""

    def prune(candidates: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        t = named_args[tensor_arg]
        block_d = int(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 16)))
        return fitting_configs(family, candidates, block_d, t.element_size(), shared_memory_limit(t.device))

    return prune


_CAN_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters
FAMILY: dict[str, str] = {}  # kernel name -> its config family (tests pin GPU_CONFIGS[family])


def autotune(family: str, key: Sequence[str], tensor_arg: str = "q_ptr") -> Callable:
    """``triton.autotune`` with the configs of ``family``, coarse ``key`` (argument names;
    Triton adds every tensor argument's dtype), shared-memory pruning and, where supported,
    results cached on disk."""
    extra = {"cache_results": True} if _CAN_CACHE_RESULTS else {}
    prune = {"early_config_prune": prune_by_shared_memory(family, tensor_arg)} if family in _STAGED else None
    tune = triton.autotune(configs=configs(family), key=list(key), prune_configs_by=prune, **extra)

    def decorate(fn):
        FAMILY[fn.__name__] = family
        return tune(fn)

    return decorate


def autotuners() -> dict[str, triton.runtime.autotuner.Autotuner]:
    """Every autotuned kernel of icd.kernels, by kernel name."""
    from triton.runtime.autotuner import Autotuner

    from . import feature_mse, instance_attention, value_mask

    found = {}
    for module in (instance_attention, value_mask, feature_mse):
        found.update({name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)})
    return found


_pinned_index: int | None = None  # set by pinned(): the backward's config too


@contextlib.contextmanager
def pinned(index: int) -> Iterator[None]:
    """Within the block every autotuned kernel runs GPU config ``index`` of its family (modulo
    the family's count), untuned, and the backward runs BACKWARD_CONFIGS[index] (modulo);
    the configs and tunings are restored afterwards. For tests and acceptance checks: each
    config can be checked (and timed) in turn, under the interpreter too."""
    global _pinned_index
    tuners = autotuners()
    saved = {name: t.configs for name, t in tuners.items()}
    previous = _pinned_index
    try:
        for name, t in tuners.items():
            family = GPU_CONFIGS[FAMILY[name]]
            t.configs = [family[index % len(family)]]
            t.cache.clear()
        _pinned_index = index
        yield
    finally:
        _pinned_index = previous
        for name, t in tuners.items():
            t.configs = saved[name]
            t.cache.clear()


# --- the backward's launch (not autotuned: its grid comes from the compiled kernel) -------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the key-slice backward. Its registers hold one
# float32 dq accumulator [BLOCK_M, D] per query block (all of K: 40 registers per thread at
# K = 300, D = 32, 8 warps), dk and dv [BLOCK_N, D] and one [BLOCK_N, BLOCK_M] tile at a time.
# A fixed choice by K (BACKWARD_RULE), not a tuned one: the slice count is sized from the
# compiled kernel (resident_programs), and the same config on every run keeps dq's
# summation order, hence its bits, run to run. Checked for spills with
# benchmarks/kernel_resources.py (sm_90, D = 32).
BACKWARD_CONFIGS: list[tuple[int, int, int, int]] = [
    (64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 1), (128, 64, 8, 2), (32, 64, 4, 2),
    (64, 32, 4, 2), (16, 64, 4, 1),
]
# (largest K, config index), in order; larger K use the last entry's config, in chunks
BACKWARD_RULE: tuple[tuple[int, int], ...] = ((64, 0), (512, 1))
INTERPRETED_BACKWARD_CONFIG = (16, 16, 1, 1)


def backward_config(num_queries: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward for K queries:
    BACKWARD_RULE, or the pinned config."""
    if _pinned_index is not None:
        return BACKWARD_CONFIGS[_pinned_index % len(BACKWARD_CONFIGS)]
    if INTERPRETED:
        return INTERPRETED_BACKWARD_CONFIG
    for largest, index in BACKWARD_RULE:
        if num_queries <= largest:
            return BACKWARD_CONFIGS[index]
    return BACKWARD_CONFIGS[BACKWARD_RULE[-1][1]]


def query_blocks(num_queries: int, block_m: int) -> tuple[int, bool]:
    """(query blocks kept on chip, chunked): ceil(K / BLOCK_M) blocks, at most
    MAX_QUERY_BLOCKS; beyond that the backward walks K in chunks of that many blocks."""
    blocks = max(1, math.ceil(num_queries / block_m))
    return min(blocks, MAX_QUERY_BLOCKS), blocks > MAX_QUERY_BLOCKS


def specialisation(value: object) -> object:
    """A stand-in for an integer launch argument that compiles to the same kernel (Triton
    specialises integers on == 1, divisibility by 16 and 64-bit range); floats as 1.0."""
    if isinstance(value, (float, torch.SymFloat)):
        return 1.0
    if isinstance(value, torch.SymInt):  # traced with dynamic shapes: guard on what Triton sees
        return 1 if value == 1 else (16 if value % 16 == 0 else 3)
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
        return 1 if value == 1 else (16 if value % 16 == 0 else 3)
    return value


def resident_programs(compiled: object, device: torch.device) -> int:
    """How many programs of a compiled kernel one multiprocessor of ``device`` holds at once,
    from the kernel's registers per thread, shared memory and warps (the CUDA occupancy rules:
    registers are allocated per warp in units of 256, each block reserves 1 KiB of shared
    memory)."""
    compiled._init_handles()
    metadata = compiled.metadata
    num_warps = int(getattr(metadata, "num_warps", None) or metadata["num_warps"])
    shared = int(getattr(metadata, "shared", None) or 0)
    props = torch.cuda.get_device_properties(device)
    warp = int(getattr(props, "warp_size", 32))
    regs_per_warp = math.ceil(max(int(compiled.n_regs), 1) * warp / 256) * 256
    by_regs = int(getattr(props, "regs_per_multiprocessor", 65536)) // (regs_per_warp * num_warps)
    by_threads = int(getattr(props, "max_threads_per_multi_processor", 2048)) // (num_warps * warp)
    shared_per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or DEFAULT_SHARED_MEMORY)
    by_shared = shared_per_sm // (shared + 1024) if shared else by_threads
    return max(1, min(by_regs, by_threads, by_shared, 32))


def num_backward_slices(device: torch.device, heads_total: int, num_keys: int, residency: int) -> int:
    """Key slices per (image, head) of the backward: as many as fill the device's resident
    program slots (``residency`` per multiprocessor) in one wave, never an almost empty
    second one, and never slices under MIN_KEYS_PER_SPLIT keys. More (image, head) pairs than
    slots get one slice each."""
    slots = residency * multiprocessor_count(device)
    wanted = max(1, slots // heads_total)
    return max(1, min(wanted, math.ceil(num_keys / MIN_KEYS_PER_SPLIT)))


def size_class(num_keys: int) -> int:
    """The autotune size class of a problem with ``num_keys`` keys: 0 toy, 1 detection-sized."""
    return int(num_keys >= SMALL_PROBLEM_KEYS)


# --- sizes and grids -------------------------------------------------------------------------


def block_d(head_dim: int) -> int:
    """The padded head-dim block: a power of two >= 16 (tl.dot's smallest operand side)."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def target_programs(device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """How many programs a grid should have to fill the device."""
    return per_sm * multiprocessor_count(device)


def num_key_splits(device: torch.device, heads_total: int, num_queries: int, num_keys: int) -> int:
    """How many slices of the S keys a split-S forward uses: enough programs to fill the device
    with the N h ceil(K / ROW_BLOCK_GUESS) query blocks, never slices under MIN_KEYS_PER_SPLIT."""
    rows = heads_total * math.ceil(num_queries / ROW_BLOCK_GUESS)
    wanted = math.ceil(target_programs(device) / rows)
    return max(1, min(wanted, math.ceil(num_keys / MIN_KEYS_PER_SPLIT)))


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU current for a launch (Triton launches on the current device); nothing to
    do (no device switch on the host path) when it is current already."""
    if t.device.type != "cuda" or t.device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


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

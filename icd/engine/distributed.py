"""Process-group set-up for ``torchrun`` (nccl on CUDA, gloo on CPU) and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from icd.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """rank / world size of this process and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun: in a process group (nccl or gloo), DDP-wrapped

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group: a torchrun launch, also of one process (the path of a larger job)."""
        return self.launched or self.world_size > 1


def resolve_device(name: str | None) -> torch.device:
    """``--device``: "cuda", "cuda:1", "cpu", or None for cuda when available else cpu."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return device


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run) started this process, at any world size."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def init_distributed(device_name: str | None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, or 1 under torchrun:
    ``torchrun --nproc_per_node 1`` runs the path of a larger job, nccl and DDP included), else a
    single process."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not launched_by_torchrun():
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank, world_size, local_rank, device, launched=True)


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` as a list (rank order); [obj] without distribution."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on every rank (one all-reduce under torchrun)."""
    if not info.distributed:
        return flag
    value = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()

"""Distributed set-up: one process per device under `torchrun` (NCCL on GPU, gloo on CPU) and the few collectives.

Without torchrun's environment (`WORLD_SIZE` unset or 1) everything here is a no-op on a single process, so the
training code reads the same either way.
"""

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mambaout.errors import UserError, one_line

__all__ = ["DEVICES", "DistEnv", "check_device", "init_distributed", "resolve_device"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run and its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` over all ranks in place (via the device for NCCL) and return it."""
        if self.distributed:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=op)
            tensor.copy_(on_device)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank."""
        return bool(self.all_reduce_(torch.tensor([int(flag)]), dist.ReduceOp.MAX).item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (pickled: small plain values only)."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`), if any.

    Args:
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; a distributed CUDA run always uses
            `cuda:<LOCAL_RANK>`, one GPU per process.

    Raises:
        UserError: CUDA asked for but not available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    target = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(device=target, rank=rank, world_size=world_size)


DEVICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def check_device(device: str) -> str:
    """`device` when it names a device this package runs on (`DEVICES`); else a `UserError` listing them."""
    if not _DEVICE.fullmatch(device):
        raise UserError(f"--device {one_line(device, 40)}: unknown device; choose {DEVICES}")
    return device


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device for a `--device` choice, made current: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N";
    with `local_rank` (a distributed run) CUDA is `cuda:<local_rank>`, one GPU per process.

    Raises:
        UserError: An unknown device, or CUDA asked for but not available.
    """
    check_device(device)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available; use --device cpu")
    if not use_cuda:
        return torch.device("cpu")
    if local_rank is not None or device in ("auto", "cuda"):
        target = torch.device("cuda", local_rank or 0)
    else:
        target = torch.device(device)
        if target.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    torch.cuda.set_device(target)
    return target

"""Processes: one, or one of a torchrun launch (NCCL on GPUs, gloo on CPU), and what they share."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from pylon import ConfigError
from pylon.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_preference: str) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=resolve_device(device_preference))
    if device_preference.startswith("cuda:"):
        raise ConfigError(f"train.device={device_preference} would put every process on one GPU; under torchrun "
                          "each takes its own (LOCAL_RANK): use auto or cuda")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gather(obj: Any, d: Dist) -> list[Any]:
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world_size
    return value


def broadcast_buffers(module: torch.nn.Module, d: Dist) -> None:
    """Every process takes rank 0's buffers of ``module`` (e.g. BatchNorm's running statistics)."""
    if d.world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def main_first(d: Dist, build: Callable[[], T]) -> T:
    """``build`` on rank 0 (which caches the data once), then on the others; a rank-0 failure is
    passed on so that no process waits forever."""
    if d.world_size == 1:
        return build()
    result, failure = None, None
    if d.is_main:
        try:
            result = build()
        except Exception as exc:  # re-raised below, after telling the other processes
            failure = exc
    message = [None if failure is None else str(failure)]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise RuntimeError(f"rank 0 failed: {message[0]}")
    return result if d.is_main else build()

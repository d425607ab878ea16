"""Device, precision (one decision for training, evaluation, prediction and tools), seeding, progress bars.

``train.amp`` takes the fastest precision that trains as well as fp32: on CUDA bf16 autocast where
supported, else fp16 with loss scaling; on a CPU with native bf16 (AVX512-BF16 or AMX) bf16, about
4x fp32 (``bench/model_speed.py``), on other CPUs fp32, since emulated bf16 is slower. Channels-last
applies on a CPU only under bf16: fp32 there is the reference path. BatchNorm statistics, the loss
and PYLON's sigmoid stay float32 under autocast.
"""
from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import numpy as np
import torch

from pylon import ConfigError

T = TypeVar("T", torch.Tensor, torch.nn.Module)


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the local GPU when there is one; a CUDA device asked for must exist."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preference} asked for, but CUDA is not available here; use auto or cpu")
    return torch.device(f"cuda:{local_rank}") if device.type == "cuda" and device.index is None else device


@functools.cache  # asked on every training step; the CPU does not change
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), as oneDNN's bf16 kernels need."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass(frozen=True)
class Precision:
    """How the model computes on ``device``: the autocast dtype (None: fp32) and the memory layout."""

    device: torch.device
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @property
    def name(self) -> str:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        return dtype + ("+channels_last" if self.channels_last else "")

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def layout(self, value: T) -> T:
        """A model or an image batch in this precision's memory layout (unchanged when contiguous)."""
        return value.to(memory_format=torch.channels_last) if self.channels_last else value


def choose_precision(device: torch.device, cfg_train: Any) -> Precision:
    dtype = None
    if cfg_train.amp and device.type == "cuda":
        fp16 = cfg_train.amp_dtype == "fp16" or (cfg_train.amp_dtype == "auto" and not torch.cuda.is_bf16_supported())
        dtype = torch.float16 if fp16 else torch.bfloat16
    elif cfg_train.amp and device.type == "cpu" and cpu_has_native_bf16():
        dtype = torch.bfloat16
    return Precision(device, dtype, bool(cfg_train.channels_last) and (device.type == "cuda" or dtype is not None))


def describe_precision(precision: Precision, cfg_train: Any) -> str:
    if not cfg_train.amp:
        why = "train.amp=false"
    elif precision.device.type == "cpu":
        why = "this CPU has native bf16" if precision.dtype else "this CPU has no native bf16, which would be slower"
    else:
        why = f"train.amp=true, train.amp_dtype={cfg_train.amp_dtype}"
    return f"{precision.name} on {precision.device} ({why})"


def bar_disabled(show: bool) -> Optional[bool]:
    """Progress bars only on a terminal (None lets tqdm check): in a log file each refresh is a line."""
    return None if show else True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

"""Checkpoints: one plain dict per file, written atomically and read without running pickled code.

A save goes to a temporary file that ``os.replace`` moves into place: a crash leaves the previous
checkpoint or the new one, never half of one. ``torch.load(weights_only=True)`` rebuilds tensors and
plain containers only. Bytes changed inside an intact archive go unnoticed: torch checks no checksums.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from pylon import PylonError

PathLike = Union[str, os.PathLike]


class CheckpointError(PylonError, ValueError):
    """A checkpoint that cannot be written, read or applied; the message names the file."""


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save's partial file; after os.replace there is none
    return path


def load_checkpoint(path: PathLike) -> dict:
    """The dict stored at ``path``; CheckpointError if it is missing, damaged or holds code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # what weights_only refused to rebuild
        if found:
            raise CheckpointError(f"{path}: refused, it holds Python code ({found.group(1)}), "
                                  "which a checkpoint written by this project never does") from None
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({str(err).splitlines()[0]})") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged archives
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def strip_wrapper_prefixes(weights: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(weights)
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        if out and all(key.startswith(prefix) for key in out):
            out = {key[len(prefix):]: value for key, value in out.items()}
    return out


def load_weights(module: nn.Module, weights: Mapping[str, Any], origin: str) -> nn.Module:
    """The one strict loader, for run checkpoints and weights files alike. A mismatch is one line naming
    ``origin`` and the first differing keys (the module is then partly loaded: discard it)."""
    weights = strip_wrapper_prefixes(weights)
    try:
        module.load_state_dict(weights)  # smp encoders drop their unused classifier's keys first
    except RuntimeError as err:  # missing or unexpected keys, shape mismatches
        expected = module.state_dict()
        groups = (("missing", [k for k in expected if k not in weights]),
                  ("unexpected", [k for k in weights if k not in expected]),
                  ("shape mismatch", [k for k in expected if k in weights and weights[k].shape != expected[k].shape]))
        detail = "; ".join(f"{label} ({len(keys)}): {', '.join(keys[:6])}" for label, keys in groups if keys)
        detail = detail or " ".join(str(err).split())[:300]
        raise CheckpointError(f"{origin}: weights do not fit this model ({detail}); "
                              "was it trained with another model config?") from None
    return module

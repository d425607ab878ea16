"""Checkpoints: atomic saving, safe loading and the full resume state of a training run.

Design points:
- A checkpoint on disk is either the previous complete file or the new complete file, never
  a half-written one: we write a temporary file next to the target, fsync it and
  ``os.replace`` it into place.
- Loading never runs pickled code. ``torch.load(weights_only=True)`` only rebuilds tensors
  and plain containers; anything else is refused with a :class:`CheckpointError`.
  ``save_checkpoint`` checks the same thing before publishing a file, so every checkpoint
  we write can be loaded safely later.
- The resume state stores random number generator states as tensors and plain lists
  (numpy's state holds an ndarray, which the safe loader would refuse).
"""
from __future__ import annotations

import dataclasses
import enum
import os
import random
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1

# Wrappers add these to every parameter name: DistributedDataParallel / DataParallel add
# "module.", torch.compile's OptimizedModule adds "_orig_mod.".
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_TEMP_SUFFIX = ".tmp"
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(ValueError):
    """A checkpoint could not be written, read or applied; the message names the file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


# --------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically and return the path.

    A crash at any moment leaves either the old file or the new one at ``path``. Temporary
    files left by a process that was killed mid-save are removed on the next save.
    numpy scalars/arrays and paths inside ``state`` are stored as Python numbers, tensors
    and str. Raises CheckpointError when ``state`` cannot be serialised or would not load
    with ``weights_only=True``; the file at ``path`` is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    # The pid in the name lets a later save tell a dead writer's leftovers from a live one.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=_TEMP_SUFFIX, dir=path.parent
    )
    tmp = Path(tmp_name)
    mode = path.stat().st_mode & 0o777 if path.exists() else _new_file_mode()
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)
            try:
                torch.save(_with_safe_leaves(dict(state)), handle)
            except Exception as exc:
                raise CheckpointError(
                    f"{path}: could not serialise the checkpoint state: {type(exc).__name__}: {exc}"
                ) from exc
            handle.flush()
            os.fsync(handle.fileno())
        _verify_safe_loadable(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict without executing any pickled code.

    Raises CheckpointError (CheckpointNotFoundError if missing) naming the file and the
    reason: missing, empty, truncated/corrupt, not a checkpoint, or containing pickled
    Python objects that safe loading refuses.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: checkpoint file does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (expected a checkpoint .pt file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (was a save interrupted?)")
    try:
        with warnings.catch_warnings():
            # Harmless note torch prints for files written with a newer pickle protocol.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: {_describe_load_failure(exc, path)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint: it holds a {type(state).__name__}, expected a dict"
        )
    return state


def _describe_load_failure(exc: Exception, path: Path | None = None) -> str:
    message = str(exc)
    unsafe = _UNSAFE_GLOBAL.search(message)
    if unsafe:
        return (
            f"refused to load: it contains a pickled Python object ({unsafe.group(1)}) whose "
            "code would have to run to rebuild it; only tensors and plain containers are "
            "loaded (weights_only=True). Re-save it with plain types if you trust its source."
        )
    first_line = message.strip().splitlines()[0] if message.strip() else "no detail"
    detail = f"{type(exc).__name__}: {first_line}"
    # Torch's own errors for damaged files vary with where the damage is, so judge the
    # file's structure instead of the message.
    head = b""
    if path is not None:
        with path.open("rb") as handle:
            head = handle.read(4)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (
                "truncated or corrupt checkpoint "
                "(the torch archive is incomplete; was a copy or save interrupted?)"
            )
        return f"corrupt checkpoint (the torch archive is damaged: {detail})"
    if head.startswith(b"\x80"):
        if isinstance(exc, EOFError) or "EOF" in message:
            return "truncated or corrupt checkpoint (the file ends early)"
        return f"not a PyTorch checkpoint (a pickle file that torch cannot read safely: {detail})"
    return (
        "not a PyTorch checkpoint (unrecognised file format; expected a file written by torch.save)"
    )


def _with_safe_leaves(value: Any) -> Any:
    """Swap numpy scalars/arrays and paths for Python numbers, tensors and str.

    Metrics computed with numpy easily end up in a checkpoint; the safe loader would refuse
    them. Containers are only rebuilt where something changed, so state_dicts (and their
    ``_metadata``) pass through untouched.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        items = {key: _with_safe_leaves(item) for key, item in value.items()}
        if all(items[key] is item for key, item in value.items()):
            return value
        rebuilt = type(value)(items) if type(value) in (dict, OrderedDict) else items
        if hasattr(value, "_metadata"):
            rebuilt._metadata = value._metadata
        return rebuilt
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        items = [_with_safe_leaves(item) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        return type(value)(items)
    return value


def _verify_safe_loadable(tmp: Path, target: Path) -> None:
    # mmap=True rebuilds the object graph without reading tensor data, so this costs little
    # even for large checkpoints.
    try:
        torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{target}: not saved, the state would not load safely: "
            + _describe_load_failure(exc, tmp)
        ) from exc


def _remove_stale_temp_files(path: Path) -> None:
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*{re.escape(_TEMP_SUFFIX)}$")
    for candidate in path.parent.glob(f".{path.name}.*{_TEMP_SUFFIX}"):
        match = pattern.match(candidate.name)
        if match and not _process_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill would terminate the process on Windows; leave its file alone
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return True


def _new_file_mode() -> int:
    # mkstemp creates 0600 files; a checkpoint should get the usual permissions instead.
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = os.umask(0o022)
        os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    return _FILE_MODE


_FILE_MODE: int | None = None


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where it is skipped.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- model weights


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Remove "module." / "_orig_mod." prefixes that wrappers put on every key.

    A prefix is only removed when *all* keys carry it, so a model whose own first submodule
    happens to be called ``module`` is left alone. The per-module version ``_metadata`` that
    ``load_state_dict`` uses is kept, with the same prefixes removed.
    """
    state = OrderedDict(state_dict)
    metadata = dict(getattr(state_dict, "_metadata", None) or {})
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = OrderedDict((key[len(prefix):], value) for key, value in state.items())
                metadata = {
                    ("" if key == prefix[:-1] else key[len(prefix):]): value
                    for key, value in metadata.items()
                    if key == prefix[:-1] or key.startswith(prefix)
                }
                changed = True
    if metadata:
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


def load_model_weights(
    model: nn.Module, source: str | os.PathLike | Mapping[str, Any]
) -> nn.Module:
    """Load weights into ``model`` (strictly) and return it.

    ``source`` is a checkpoint path or an already loaded dict: either a training checkpoint
    (weights under "model") or a bare state_dict. Wrapper prefixes are stripped on both
    sides. A mismatch raises CheckpointError listing missing, unexpected and mis-shaped keys.
    """
    if isinstance(source, Mapping):
        state, origin = dict(source), "<state dict>"
    else:
        state, origin = load_checkpoint(source), str(source)
    # A training checkpoint nests the weights under "model"; a bare state_dict maps
    # parameter names straight to tensors.
    weights = state["model"] if isinstance(state.get("model"), Mapping) else state
    if "format_version" in state and weights is state:
        raise CheckpointError(f"{origin}: training checkpoint without a 'model' state dict")
    _load_state_dict_strict(unwrap_model(model), weights, origin)
    return model


def _load_state_dict_strict(model: nn.Module, weights: Mapping[str, Any], origin: str) -> None:
    weights = strip_wrapper_prefixes(weights)
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    mis_shaped = [
        f"{key} (checkpoint {tuple(weights[key].shape)} vs model {tuple(expected[key].shape)})"
        for key in expected
        if key in weights
        and isinstance(weights[key], torch.Tensor)
        and weights[key].shape != expected[key].shape
    ]
    if missing or unexpected or mis_shaped:
        parts = [
            f"{label} ({len(keys)}): {_preview(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mis_shaped),
            )
            if keys
        ]
        raise CheckpointError(
            f"{origin}: weights do not match the model ({type(model).__name__}); "
            + "; ".join(parts)
            + ". Was the checkpoint trained with a different model config?"
        )
    model.load_state_dict(weights, strict=True)


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy (global), torch CPU and every CUDA device, as safe types.

    In DDP each rank has its own states; a checkpoint written by rank 0 holds rank 0's.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            # uint32 keys fit in int64 exactly; tensors load under weights_only, ndarrays don't.
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        # Only when CUDA is in use: reading the states would otherwise start CUDA needlessly.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = torch.as_tensor(npst["keys"]).cpu().numpy().astype(np.uint32)
    np.random.set_state(
        (
            npst["kind"],
            keys,
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        n_devices = torch.cuda.device_count()
        if len(cuda_states) != n_devices:
            warnings.warn(
                f"checkpoint holds RNG states for {len(cuda_states)} CUDA devices but "
                f"{n_devices} are visible; restoring the first {min(len(cuda_states), n_devices)}",
                RuntimeWarning,
                stacklevel=2,
            )
        for device, cuda_state in enumerate(cuda_states[:n_devices]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)


# --------------------------------------------------------------------------- resume state


REQUIRED_LOOP_KEYS = ("epoch", "global_step")


def training_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    loop: Mapping[str, Any] | Any,
    config: Mapping[str, Any] | Any = None,
) -> dict[str, Any]:
    """Everything needed to continue training exactly where it stopped.

    ``model`` may be wrapped (DDP, torch.compile); its plain state_dict is stored.
    ``loop`` is the loop's progress as plain values (a mapping or dataclass) and must hold
    ``epoch`` (epochs completed) and ``global_step``; typically also the best value and its
    epoch, the early-stop counter and a stop reason. :func:`restore_training_state` gives
    it back as a dict. ``config`` (the resolved experiment config) is stored as plain data.
    Optimizer, scheduler and scaler may be None.
    """
    loop_state = to_plain(loop, "loop")
    if not isinstance(loop_state, dict) or any(k not in loop_state for k in REQUIRED_LOOP_KEYS):
        raise ValueError(f"loop must be a mapping with {' and '.join(REQUIRED_LOOP_KEYS)}")
    return {
        "format_version": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loop": loop_state,
        "rng": capture_rng_state(),
        "config": to_plain(config, "config") if config is not None else {},
    }


def restore_training_state(
    state: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
    origin: str = "<checkpoint>",
) -> dict[str, Any]:
    """Apply a dict from :func:`training_state` (e.g. via :func:`load_checkpoint`) and
    return its ``loop`` dict.

    Objects passed as None are skipped; ``model`` may be wrapped. ``origin`` (e.g. the file
    path) goes into error messages. RNG states are restored last, so nothing here draws
    random numbers after them.
    """
    version = state.get("format_version")
    if version is None or "model" not in state or "loop" not in state:
        raise CheckpointError(
            f"{origin}: not a training checkpoint (no format_version/model/loop entries); "
            "resume needs a checkpoints/last.pt written by training"
        )
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{origin}: checkpoint format {version} is newer than this code supports "
            f"({FORMAT_VERSION})"
        )
    _load_state_dict_strict(unwrap_model(model), state["model"], origin)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None:
            continue
        saved = state.get(name)
        if saved is None:
            raise CheckpointError(f"{origin}: has no {name} state to restore")
        try:
            target.load_state_dict(saved)
        except Exception as exc:
            raise CheckpointError(
                f"{origin}: {name} state does not fit this {type(target).__name__}: {exc}"
            ) from exc
    if restore_rng and state.get("rng"):
        restore_rng_state(state["rng"])
    return dict(state["loop"])


def to_plain(value: Any, where: str = "value") -> Any:
    """Convert config-like data to types that load under weights_only=True.

    Mappings (OmegaConf DictConfig included), dataclasses, sequences, str/int/float/bool/None,
    Paths (-> str), enums (-> value), numpy scalars (-> Python). Anything else raises
    TypeError naming its location.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_plain(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): to_plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = [to_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__} in a checkpoint; "
        "use plain values (dict, list, str, numbers, bool, None)"
    )

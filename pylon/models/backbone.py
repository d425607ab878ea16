"""The ResNet encoder both models share: building it, filling it with pretrained weights,
loading whole-model checkpoints and freezing it.

Weights come from exactly one place, ``build_encoder``:

* ``None``: random initialisation.
* ``"imagenet"``: the ImageNet weights segmentation-models-pytorch publishes on the Hugging
  Face hub. They are taken from the local hub cache when present; otherwise the hub must be
  reachable, and when it is not we fail at once with a message saying what to do instead
  (the hub client would otherwise retry for about half a minute before giving up).
* a local file: a ResNet state dict with torchvision / smp key names (``conv1.weight``,
  ``layer1.0.conv1.weight``, ...; an ``fc.*`` classifier is ignored), as ``.pth``/``.pt``
  (read with ``torch.load(weights_only=True)``) or ``.safetensors``.

Three-channel weights are fitted to other input channel counts the way smp does it (for one
channel: conv1 summed over RGB), so a grayscale model starts from the same function of the
image that the RGB network computed on a gray image.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Mapping, Optional, Union
from urllib.parse import urlparse
from urllib.request import getproxies

import torch
from torch import nn

SUPPORTED_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FREEZE_OPTIONS = (None, "enc")

# Key prefixes a ResNet state dict commonly carries when it was saved as part of a bigger
# model (DDP wrapper, smp segmentation model, this project's own models).
_ENCODER_KEY_PREFIXES = ("", "module.", "encoder.", "module.encoder.", "net.encoder.", "backbone.")

WeightsSpec = Union[None, str, os.PathLike]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be fetched (typically: no network)."""


class WeightsFileError(ValueError):
    """A weights / checkpoint file is missing, unreadable or does not fit the model."""


def check_backbone(backbone: str) -> None:
    if backbone not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"model.backbone={backbone!r} is not supported; choose one of {list(SUPPORTED_BACKBONES)}"
        )


def check_freeze(freeze: Optional[str]) -> None:
    if freeze not in FREEZE_OPTIONS:
        raise ValueError(f"model.freeze={freeze!r} is not supported; use null or 'enc'")


def check_weights_spec(weights: WeightsSpec) -> None:
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            f"model.weights={weights!r} must be null, 'imagenet' or the path of a local weights file"
        )


def check_channels(n_in: int, n_out: int) -> None:
    for name, value in (("n_in", n_in), ("n_out", n_out)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{name}={value!r} must be a positive integer")


def check_input(x: torch.Tensor, n_in: int) -> None:
    """Reject inputs whose shape cannot give the documented heatmap size."""
    if x.dim() != 4 or x.shape[1] != n_in:
        raise ValueError(f"expected input of shape (N, {n_in}, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % 32 or w % 32 or h < 32 or w < 32:
        raise ValueError(
            f"input height and width must be positive multiples of 32 (the encoder's stride), "
            f"got {h}x{w}; resize the images (data.image_size) accordingly"
        )


# ---------------------------------------------------------------------------- building


def build_encoder(backbone: str, n_in: int, weights: WeightsSpec) -> nn.Module:
    """A depth-5 smp ResNet encoder with ``n_in`` input channels and the given weights.

    Its forward returns the list of 6 feature maps (input, 1/2, 1/4, 1/8, 1/16, 1/32).
    """
    from segmentation_models_pytorch.encoders import get_encoder

    check_backbone(backbone)
    check_weights_spec(weights)
    if weights is None:
        return get_encoder(backbone, in_channels=n_in, depth=5, weights=None)

    if str(weights) == "imagenet":
        path = _imagenet_weights_file(backbone)
        origin = f"ImageNet weights for {backbone} ({path})"
    else:
        path = Path(weights).expanduser()
        origin = f"weights file {str(weights)!r}"
        if not path.is_file():
            raise WeightsFileError(
                f"model.weights={str(weights)!r}: no such file (use 'imagenet', null, or the "
                f"path of a ResNet state dict)"
            )
    state = _encoder_state_dict(_read_state_dict(path), origin)
    file_in = state["conv1.weight"].shape[1]
    if file_in not in (n_in, 3):
        raise WeightsFileError(
            f"{origin}: conv1 takes {file_in} input channels, cannot be fitted to n_in={n_in}"
        )
    # Build with the file's channel count, load, then adapt conv1 like smp does for hub weights.
    encoder = get_encoder(backbone, in_channels=file_in, depth=5, weights=None)
    _load_strict(encoder, state, origin)
    if file_in != n_in:
        encoder.set_in_channels(n_in, pretrained=True)
    return encoder


def _imagenet_weights_file(backbone: str) -> Path:
    """Local path of smp's ImageNet weights for ``backbone``, downloading them if possible."""
    from huggingface_hub import constants, hf_hub_download
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[backbone]["pretrained_settings"]["imagenet"]
    fetch = dict(repo_id=settings["repo_id"], filename="model.safetensors", revision=settings["revision"])
    advice = (
        "set model.weights=null (`weights: null`) to start from random weights, or set "
        "model.weights to the path of a local ResNet state dict (.pth or .safetensors)"
    )
    try:  # a cached copy needs no network at all
        return Path(hf_hub_download(**fetch, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass

    # The hub client reads HF_HUB_OFFLINE once at import; honour a later change as well.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} are not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE is set; {advice}"
        )
    endpoint = constants.ENDPOINT
    # Behind a proxy a direct connection says nothing: leave it to the hub client then.
    if not getproxies() and not _reachable(endpoint):
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} must be downloaded from the Hugging Face hub "
            f"({endpoint}), which cannot be reached from this machine; {advice}"
        )
    try:
        return Path(hf_hub_download(**fetch))
    except Exception as err:  # noqa: BLE001 - hub/HTTP errors come in many types
        raise WeightsUnavailableError(
            f"downloading ImageNet weights for {backbone} from {settings['repo_id']} failed "
            f"({type(err).__name__}: {err}); {advice}"
        ) from err


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- state dicts


def _read_state_dict(path: Path) -> dict:
    """Tensors of a weights/checkpoint file, read without executing pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and safetensors errors differ
        raise WeightsFileError(
            f"cannot read weights from {str(path)!r}: {type(err).__name__}: {err} (expected a "
            f"state dict saved with torch.save, or a .safetensors file)"
        ) from err
    # Training checkpoints wrap the weights next to optimizer state etc.
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(wrapper), Mapping):
            data = data[wrapper]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsFileError(
            f"{str(path)!r} does not hold a state dict (a mapping of names to tensors, "
            f"possibly under a 'model' key)"
        )
    return dict(data)


def _encoder_state_dict(state: Mapping[str, torch.Tensor], origin: str) -> dict:
    """The ResNet part of ``state`` with plain torchvision key names."""
    for prefix in _ENCODER_KEY_PREFIXES:
        if prefix + "conv1.weight" in state:
            return {
                key[len(prefix):]: value
                for key, value in state.items()
                if key.startswith(prefix) and not key[len(prefix):].startswith("fc.")
            }
    raise WeightsFileError(
        f"{origin} has no ResNet 'conv1.weight' (looked under prefixes "
        f"{[p for p in _ENCODER_KEY_PREFIXES if p]} too); first keys: {list(state)[:5]}"
    )


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    # Compare key sets ourselves: smp's encoder.load_state_dict does not return the result.
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsFileError(
            f"{origin} does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:  # size mismatches, e.g. resnet50 weights into resnet101
        raise WeightsFileError(f"{origin} does not fit the model: {err}") from err


def load_model_checkpoint(
    model: nn.Module,
    path: Union[str, os.PathLike],
    translate: Optional[Callable[[dict], dict]] = None,
) -> None:
    """Initialise the whole ``model`` from a checkpoint file (``pretrain``).

    The file may hold a raw state dict or a dict with the state dict under ``"model"``;
    a ``module.`` prefix (DistributedDataParallel) is dropped. ``translate`` lets a model
    accept other key layouts (e.g. the original PYLON code's names).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileError(f"model.pretrain={str(path)!r}: no such file")
    state = _read_state_dict(path)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    if translate is not None:
        state = translate(state)
    _load_strict(model, state, f"checkpoint {str(path)!r}")


# ---------------------------------------------------------------------------- freezing


class EncoderModel(nn.Module):
    """Base for models with an ``encoder`` that may be frozen (``freeze='enc'``)."""

    encoder: nn.Module
    frozen_encoder: bool = False

    def freeze_encoder(self) -> None:
        self.frozen_encoder = True
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "EncoderModel":
        super().train(mode)
        if self.frozen_encoder:
            # requires_grad=False stops the weights, but BatchNorm in train mode would still
            # normalise with batch statistics and overwrite its running mean/var every step:
            # the "frozen" encoder would compute a different function than the one it was
            # frozen as. Eval mode keeps it a fixed feature extractor.
            self.encoder.eval()
        return self

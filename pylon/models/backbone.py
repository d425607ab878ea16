"""What both models share: the encoder (any segmentation-models-pytorch encoder) and its
weights, whole-model checkpoints, freezing, and the output type."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
from segmentation_models_pytorch.encoders import get_encoder
from segmentation_models_pytorch.encoders._utils import patch_first_conv
from torch import nn

from pylon import PylonError
from pylon.checkpoint import CheckpointError, load_weights, strip_wrapper_prefixes

WeightsSpec = Union[None, str, os.PathLike]

# Where encoder weights sit inside bigger state dicts (DDP, smp models, this project's models).
ENCODER_PREFIXES = ("", "module.", "encoder.", "module.encoder.", "net.encoder.", "backbone.")


class WeightsUnavailableError(PylonError, RuntimeError):
    """Pretrained weights were asked for but cannot be fetched (typically: no network)."""


class WeightsFileError(CheckpointError):
    """A model.weights / model.pretrain file that is missing, unreadable or holds no usable state
    dict; one that does not fit the model is refused by ``checkpoint.load_weights``."""


class ModelOutput(NamedTuple):
    """``logits`` (N, n_out) and ``heatmap`` (N, n_out, h, w) per-pixel logits (PYLON: logits ==
    heatmap.amax((-2, -1)); baselines: the heatmap is the CAM)."""

    logits: torch.Tensor
    heatmap: torch.Tensor


def build_encoder(name: str, n_in: int, weights: WeightsSpec, state: Optional[dict] = None) -> nn.Module:
    """A depth-5 smp encoder (forward: the input and the feature maps at 1/2 ... 1/32) with
    ``n_in`` input channels and ``weights``: None (random), "imagenet" (smp's, from the Hugging
    Face hub), a local state dict file, whose three-channel weights are fitted to ``n_in`` the
    way smp does it (one channel: the first conv summed over RGB), or a trained run's folder (its
    best.pt: any model of this project with the same encoder). ``state``: that file's tensors,
    when the caller has read them already."""
    if weights is None:
        return get_encoder(name, in_channels=n_in, depth=5, weights=None)
    if str(weights) == "imagenet":
        try:  # timm ("tu-") encoders take a flag: the weights variant is part of their name
            return get_encoder(name, in_channels=n_in, depth=5, weights=True if name.startswith("tu-") else "imagenet")
        except Exception as err:  # noqa: BLE001 - the hub's and HTTP errors come in many types
            raise WeightsUnavailableError(
                f"cannot get the ImageNet weights of {name} ({type(err).__name__}: {err}); to work offline set "
                "model.weights=null (random weights) or model.weights=/path/to/local/file (.pth/.pt/.safetensors), "
                "or download the weights into the Hugging Face cache beforehand and set HF_HUB_OFFLINE=1") from err
    path = weights_file(weights)
    return _encoder_from_state(name, n_in, read_state_dict(path, "model.weights") if state is None else state, path)


def weights_file(weights: Union[str, os.PathLike]) -> Path:
    """The file a local ``model.weights`` names: a run folder stands for the weights it selected."""
    path = Path(weights).expanduser()
    return path / "checkpoints" / "best.pt" if path.is_dir() else path


def source_run(weights: WeightsSpec) -> Optional[Path]:
    """The trained run whose checkpoint ``model.weights`` names (its folder, or a file in its
    ``checkpoints/``), else None: imagenet, null, or a plain state dict, which stays encoder-only."""
    if weights is None or str(weights) == "imagenet":
        return None
    path = Path(weights).expanduser()
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _encoder_from_state(name: str, n_in: int, state: dict, path: Path) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # only for key names: leave the random stream alone
        probe = get_encoder(name, in_channels=3, depth=5, weights=None)
    # The first convolution is the one smp fits to other channel counts.
    stem = next(k for k, m in probe.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3) + ".weight"
    prefix = next((p for p in ENCODER_PREFIXES if p + stem in state), None)
    if prefix is None:
        raise WeightsFileError(f"model.weights={str(path)!r} has no {name} encoder: no key {stem!r}, also under "
                               f"{list(ENCODER_PREFIXES[1:])}; its first keys: {list(state)[:5]}")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    file_in = state[stem].shape[1]
    if file_in not in (3, n_in):
        raise WeightsFileError(f"model.weights={str(path)!r} takes {file_in} input channels, cannot fit n_in={n_in}")
    # Built with the file's channel count (random numbers drawn as for that count), then fitted.
    encoder = get_encoder(name, in_channels=file_in, depth=5, weights=None)
    load_weights(encoder, state, f"model.weights={str(path)!r}")
    if file_in != n_in:
        fit = getattr(encoder, "set_in_channels", None) or partial(patch_first_conv, encoder)
        fit(n_in, pretrained=True)
    return encoder


def read_state_dict(path: Path, key: str) -> dict:
    """The tensors of a .safetensors file or of a torch.save file (read without running pickled
    code); a training checkpoint's are taken from under "model" / "state_dict"."""
    if not path.is_file():
        raise WeightsFileError(f"{key}={str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and safetensors errors differ
        detail = " ".join(str(err).split())[:300]
        raise WeightsFileError(f"cannot read {key}={str(path)!r}: {type(err).__name__}: {detail}") from err
    data = next((data[k] for k in ("model", "state_dict", "model_state_dict")
                 if isinstance(data, dict) and isinstance(data.get(k), dict)), data)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsFileError(f"{key}={str(path)!r} holds no state dict (names -> tensors, maybe under 'model')")
    return dict(data)


def load_model_checkpoint(model: nn.Module, path: Union[str, os.PathLike],
                          translate: Optional[Callable[[dict], dict]] = None) -> None:
    """Initialise the whole ``model`` from a checkpoint file (``pretrain``); wrapper prefixes
    (DDP, torch.compile) are dropped, ``translate`` may rename other key layouts."""
    state = strip_wrapper_prefixes(read_state_dict(Path(path).expanduser(), "model.pretrain"))
    load_weights(model, translate(state) if translate else state, f"model.pretrain={str(path)!r}")


def load_matching(module: nn.Module, state: dict, prefixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Copy into ``module`` each tensor of ``state`` under ``prefixes`` whose name and shape match
    its own (a decoder of another width or depth keeps what fits); (loaded, not loaded) names."""
    state = strip_wrapper_prefixes(state)
    own = module.state_dict()
    wanted = [k for k in own if k.startswith(prefixes)]
    fits = {k: state[k] for k in wanted if k in state and state[k].shape == own[k].shape}
    module.load_state_dict(fits, strict=False)  # only the names in ``fits``: the rest keeps its initialisation
    return list(fits), [k for k in wanted if k not in fits]


def read_run_state(weights: WeightsSpec) -> Optional[dict]:
    """The tensors of the trained run's checkpoint ``weights`` names (see ``source_run``), else None."""
    return None if source_run(weights) is None else read_state_dict(weights_file(weights), "model.weights")


def weights_origin(weights: WeightsSpec, note: Optional[str] = None) -> Optional[dict]:
    """What a run records as ``init_from``: the resolved file a local ``model.weights`` named,
    the run it belongs to (None for a plain state dict) and ``note``, what was loaded from it."""
    if weights is None or str(weights) == "imagenet":
        return None
    run = source_run(weights)
    return {"path": str(weights_file(weights).resolve()), "run": None if run is None else run.resolve().name,
            "loaded": note}


def init_beyond_encoder(model: nn.Module, weights: WeightsSpec, run_state: Optional[dict],
                        prefixes: tuple[str, ...]) -> Optional[str]:
    """Give ``model`` the tensors under ``prefixes`` (its head) that fit from a run's checkpoint,
    after the encoder got its weights; the one line a run prints about what ``model.weights`` loaded."""
    if weights is None or str(weights) == "imagenet":
        return None
    parts, missing = "encoder", []
    if run_state is not None:
        loaded, missing = load_matching(model, run_state, prefixes)
        head = "/".join(prefix.rstrip(".") for prefix in prefixes)
        parts = f"encoder + {len(loaded)} of {len(loaded) + len(missing)} {head} tensors"
    run = source_run(weights)
    origin = f"run {run.name} ({weights_file(weights)})" if run is not None else str(weights_file(weights))
    more = f"; not loaded: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else ""
    return f"model.weights: {parts} from {origin}{more}"


class EncoderModel(nn.Module):
    """Base of both models: an ``encoder`` that can be frozen, whole or only its BatchNorm statistics."""

    encoder: nn.Module
    frozen_encoder: bool = False
    frozen_encoder_bn: bool = False
    init_note: Optional[str] = None  # what a local model.weights file gave the model (init_beyond_encoder)

    def apply_freeze(self, mode: Optional[str]) -> None:
        """``model.freeze``: 'enc' freezes the encoder, 'bn' only its BatchNorm statistics, None nothing."""
        if mode == "enc":
            self.freeze_encoder()
        self.frozen_encoder_bn = mode == "bn"

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Frozen: no gradients, and eval mode even while the model trains; unfrozen: trains again."""
        self.frozen_encoder = frozen
        self.encoder.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> "EncoderModel":
        super().train(mode)
        if self.frozen_encoder:
            # BatchNorm in train mode would normalise with batch statistics and overwrite its
            # running ones: the frozen encoder would no longer compute what it was frozen as.
            self.encoder.eval()
        elif self.frozen_encoder_bn:
            # Pretrained statistics kept: batch statistics of a few films would replace them
            # (and weights with batch norm folded in carry identity statistics that only make
            # sense as they are). The affine parameters still train.
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

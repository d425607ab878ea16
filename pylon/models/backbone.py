"""What both models share: the encoder (any segmentation-models-pytorch encoder) and its
weights, whole-model checkpoints, freezing, and the output type."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

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


def resolve_weights(weights: WeightsSpec) -> tuple[Optional[Path], Optional[Path]]:
    """(file, run) of a local ``model.weights``: the file it names (a run folder stands for the weights
    it selected) and the trained run that file is in (its folder, or a file in its ``checkpoints/``),
    None for a plain state dict, which stays encoder-only; (None, None) for None and "imagenet"."""
    if weights is None or str(weights) == "imagenet":
        return None, None
    path = Path(weights).expanduser()
    if path.is_dir():
        return path / "checkpoints" / "best.pt", path
    return path, path.parent.parent if path.parent.name == "checkpoints" else None


def build_encoder(name: str, n_in: int, weights: Union[None, str, Path], state: Optional[dict] = None,
                  depth: int = 5) -> nn.Module:
    """An smp encoder of ``depth`` stages (forward: the input and the feature maps at 1/2 ... 1/2**depth) with ``n_in``
    input channels and ``weights``: None (random), "imagenet" (smp's, from the Hugging Face hub), or
    a local file whose tensors are ``state`` (a state dict, or a trained run's best.pt: any model of
    this project with the same encoder); three-channel ones are fitted to ``n_in`` as smp does it."""
    if weights is None:
        return get_encoder(name, in_channels=n_in, depth=depth, weights=None)
    if str(weights) == "imagenet":
        try:  # timm ("tu-") encoders take a flag: the weights variant is part of their name
            return get_encoder(name, in_channels=n_in, depth=depth, weights=True if name.startswith("tu-") else "imagenet")
        except Exception as err:  # noqa: BLE001 - the hub's and HTTP errors come in many types
            raise WeightsUnavailableError(
                f"cannot get the ImageNet weights of {name} ({type(err).__name__}: {err}); to work offline set "
                "model.weights=null (random weights) or model.weights=/path/to/local/file (.pth/.pt/.safetensors), "
                "or download the weights into the Hugging Face cache beforehand and set HF_HUB_OFFLINE=1") from err
    origin = f"model.weights={str(weights)!r}"
    with torch.random.fork_rng(devices=[]):  # only for key names: leave the random stream alone
        probe = get_encoder(name, in_channels=3, depth=5, weights=None)
    # The first convolution is the one smp fits to other channel counts.
    stem = next(k for k, m in probe.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3) + ".weight"
    prefix = next((p for p in ENCODER_PREFIXES if p + stem in state), None)
    if prefix is None:
        raise WeightsFileError(f"{origin} has no {name} encoder: no key {stem!r}, also under "
                               f"{list(ENCODER_PREFIXES[1:])}; its first keys: {list(state)[:5]}")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    file_in = state[stem].shape[1]
    if file_in not in (3, n_in):
        raise WeightsFileError(f"{origin} takes {file_in} input channels, cannot fit n_in={n_in}")
    # Built with the file's channel count (random numbers drawn as for that count), then fitted.
    encoder = get_encoder(name, in_channels=file_in, depth=depth, weights=None)
    load_weights(encoder, state, origin)
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


def load_matching(module: nn.Module, state: dict, prefixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Copy into ``module`` each tensor of ``state`` under ``prefixes`` whose name and shape match
    its own (a decoder of another width or depth keeps what fits); (loaded, not loaded) names."""
    state, own = strip_wrapper_prefixes(state), module.state_dict()
    wanted = [k for k in own if k.startswith(prefixes)]
    fits = {k: state[k] for k in wanted if k in state and state[k].shape == own[k].shape}
    module.load_state_dict(fits, strict=False)  # only the names in ``fits``: the rest keeps its initialisation
    return list(fits), [k for k in wanted if k not in fits]


class EncoderModel(nn.Module):
    """Base of both models: an ``encoder`` with its ``model.weights``, what the model's ``build_head``
    adds, a ``pretrain`` checkpoint over it all, and freezing (the encoder, or its BatchNorm statistics)."""

    head_prefixes: tuple[str, ...] = ()  # what a trained run's checkpoint in model.weights also gives, if it fits
    frozen_encoder: bool = False
    frozen_encoder_bn: bool = False
    init_note: Optional[str] = None  # the one line a run prints about what a local model.weights loaded

    def __init__(self, conf: Any):
        super().__init__()
        self.conf = conf
        # A whole-model checkpoint overwrites the encoder anyway: do not fetch its weights.
        weights = None if conf.pretrain is not None else conf.weights
        file, run = resolve_weights(weights)
        state = None if file is None else read_state_dict(file, "model.weights")
        self.encoder = build_encoder(conf.backbone, conf.n_in, file or weights, state, conf.encoder_depth)
        # smp keeps the stages past encoder_depth (files of deeper encoders still load) but never runs them:
        # they stay frozen, so that neither the optimizer nor DDP waits for their gradients.
        stages = getattr(self.encoder, "get_stages", dict)()
        self.idle_stages = [m for stride, modules in stages.items() if stride > 2**conf.encoder_depth for m in modules]
        self.build_head(conf)
        if file is not None:  # the one line a run prints about what model.weights gave the model
            parts, missing = "encoder", []
            if run is not None:  # a trained run's checkpoint: the head tensors that fit too
                loaded, missing = load_matching(self, state, self.head_prefixes)
                head = "/".join(prefix.rstrip(".") for prefix in self.head_prefixes)
                parts = f"encoder + {len(loaded)} of {len(loaded) + len(missing)} {head} tensors"
            more = f"; not loaded: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else ""
            origin = f"run {run.name} ({file})" if run is not None else file
            self.init_note = f"model.weights: {parts} from {origin}{more}"
        if conf.pretrain is not None:
            state = strip_wrapper_prefixes(read_state_dict(Path(conf.pretrain).expanduser(), "model.pretrain"))
            load_weights(self, self.translate_keys(state), f"model.pretrain={str(conf.pretrain)!r}")
        self.freeze_encoder(conf.freeze == "enc")
        self.frozen_encoder_bn = conf.freeze == "bn"

    @staticmethod
    def translate_keys(state: dict) -> dict:
        """A ``pretrain`` state dict of another implementation in this model's names."""
        return state

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Frozen: no gradients, and eval mode even while the model trains; unfrozen: trains again."""
        self.frozen_encoder = frozen
        self.encoder.requires_grad_(not frozen)
        for stage in self.idle_stages:
            stage.requires_grad_(False)
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

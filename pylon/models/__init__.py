"""Models: PYLON and the baseline ResNet classifier, both returning ``ModelOutput``."""
from __future__ import annotations

import dataclasses
from typing import Any, Union

from torch import nn

from .backbone import SUPPORTED_BACKBONES, WeightsFileError, WeightsUnavailableError
from .baseline import BaselineClassifier, BaselineConfig
from .output import ModelOutput
from .pylon import Pylon, PylonConfig

MODEL_CONFIGS = {"pylon": PylonConfig, "baseline": BaselineConfig}

__all__ = [
    "MODEL_CONFIGS",
    "SUPPORTED_BACKBONES",
    "BaselineClassifier",
    "BaselineConfig",
    "ModelOutput",
    "Pylon",
    "PylonConfig",
    "WeightsFileError",
    "WeightsUnavailableError",
    "build_model",
    "build_model_from_config",
    "model_config",
]


def model_config(arch: str, **fields: Any) -> Union[PylonConfig, BaselineConfig]:
    """The config dataclass for ``arch`` ('pylon' | 'baseline'), validated."""
    if arch not in MODEL_CONFIGS:
        raise ValueError(f"model.arch={arch!r} is not supported; use one of {list(MODEL_CONFIGS)}")
    cls = MODEL_CONFIGS[arch]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown} for arch {arch!r}; valid fields: {sorted(known)}")
    try:
        return cls(**fields)
    except TypeError as err:  # a required field (n_in / n_out for PYLON) is missing
        raise ValueError(f"model config for arch {arch!r}: {err}") from err


def build_model(arch: str, **fields: Any) -> nn.Module:
    """``build_model("pylon", n_in=1, n_out=1, weights=None)`` -> a ``Pylon`` module."""
    return model_config(arch, **fields).make_model()


def build_model_from_config(model_cfg: Any) -> nn.Module:
    """The model described by an experiment config's ``model`` section (see pylon.config)."""
    fields = dict(
        n_in=model_cfg.n_in,
        n_out=model_cfg.n_out,
        backbone=model_cfg.backbone,
        weights=model_cfg.weights,
        freeze=model_cfg.freeze,
        pretrain=model_cfg.pretrain,
    )
    if model_cfg.arch == "pylon":
        fields.update(dict(model_cfg.decoder))
    else:
        fields["pooling"] = model_cfg.pooling
    return build_model(model_cfg.arch, **fields)

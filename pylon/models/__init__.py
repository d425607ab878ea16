"""Models: PYLON and the baseline classifier over any segmentation-models-pytorch encoder,
both returning ``ModelOutput(logits, heatmap)``."""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .backbone import ModelOutput, WeightsFileError, WeightsUnavailableError, weights_origin
from .baseline import BaselineClassifier, BaselineConfig
from .ensemble import Ensemble
from .pylon import Pylon, PylonConfig

__all__ = ["BaselineClassifier", "BaselineConfig", "Ensemble", "ModelOutput", "Pylon", "PylonConfig", "WeightsFileError",
           "WeightsUnavailableError", "build_model", "init_from", "unwrap"]


def build_model(model_cfg: Any) -> nn.Module:
    """The model an experiment config's (already validated) ``model`` section describes."""
    fields = {name: model_cfg[name] for name in ("n_in", "n_out", "backbone", "weights", "freeze", "pretrain")}
    if model_cfg.arch == "pylon":
        return PylonConfig(**fields, **model_cfg.decoder).make_model()
    return BaselineConfig(**fields, pooling=model_cfg.pooling).make_model()


def init_from(model_cfg: Any, model: nn.Module) -> Optional[dict]:
    """Where ``model`` (built from ``model_cfg``) got its weights, for the run's records; None for
    ImageNet, random and ``pretrain`` starts."""
    if model_cfg.pretrain is not None:
        return None
    return weights_origin(model_cfg.weights, getattr(unwrap(model), "init_note", None))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model

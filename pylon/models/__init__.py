"""Models: PYLON and the baseline classifier over any segmentation-models-pytorch encoder,
both returning ``ModelOutput(logits, heatmap)``, and their ``Ensemble``."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .backbone import ModelOutput, WeightsFileError, WeightsUnavailableError, resolve_weights
from .baseline import BaselineClassifier, BaselineConfig
from .pylon import Pylon, PylonConfig

__all__ = ["BaselineClassifier", "BaselineConfig", "Ensemble", "ModelOutput", "Pylon", "PylonConfig", "WeightsFileError",
           "WeightsUnavailableError", "build_model", "init_from", "unwrap"]


def build_model(model_cfg: Any) -> nn.Module:
    """The model an experiment config's (already validated) ``model`` section describes."""
    fields = {name: model_cfg[name] for name in ("n_in", "n_out", "backbone", "encoder_depth", "weights", "freeze", "pretrain")}
    if model_cfg.arch == "pylon":
        return PylonConfig(**fields, **model_cfg.decoder).make_model()
    return BaselineConfig(**fields, pooling=model_cfg.pooling).make_model()


def init_from(model_cfg: Any, model: nn.Module) -> Optional[dict]:
    """Where ``model`` (built from ``model_cfg``) got its weights, for the run's records: the resolved
    file a local ``model.weights`` named, the run it belongs to (None for a plain state dict) and
    what was loaded from it; None for ImageNet, random and ``pretrain`` starts."""
    file, run = resolve_weights(model_cfg.weights)
    if model_cfg.pretrain is not None or file is None:
        return None
    return {"path": str(file.resolve()), "run": None if run is None else run.resolve().name,
            "loaded": getattr(unwrap(model), "init_note", None)}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _mean_probability_logit(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    # float64: a float32 logit of a mean probability near 1 would round to a few values and tie
    mean = torch.stack([torch.sigmoid(x.double()) for x in logits]).mean(0)
    return torch.logit(mean, eps=1e-15).float()


class Ensemble(nn.Module):
    """Models of one architecture as one (the k fold models of a cross-validation, scored on data
    outside the folds): logits and heatmap are those of the members' mean probabilities (the
    methods of ``pylon.heatmaps`` average the members' maps)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        kinds = {type(m) for m in members}
        if len(kinds) != 1:
            raise ValueError(f"an ensemble needs models of one kind, got {sorted(k.__name__ for k in kinds)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        outputs = [member(x) for member in self.members]
        return ModelOutput(_mean_probability_logit([o.logits for o in outputs]),
                           _mean_probability_logit([o.heatmap for o in outputs]))

"""Baseline: a plain ResNet classifier (global pooling + linear layer) whose heatmap is its
class activation map (CAM, Zhou et al. 2016).

The CAM is the linear layer applied at every location of the last feature map,
``cam[n, k] = fc.weight[k] . features[n, :, i, j] + fc.bias[k]``, at 1/32 of the input.
How the logits relate to it depends on ``pooling``:

* ``'avg'`` (the usual ResNet): ``logits = fc(mean of features)``; the layer is linear, so
  ``logits == heatmap.mean((-2, -1))`` exactly.
* ``'max'`` (the "max-pool baseline" of the PYLON paper): the max is taken over the class map,
  ``logits = heatmap.amax((-2, -1))``, like PYLON but at 1/32 and without a decoder.
  (Max-pooling the features *before* the linear layer would break any such relation.)

``target_layer`` (the last ResNet stage) is what Grad-CAM hooks; ``features(x)`` returns
its output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import (
    EncoderModel,
    WeightsSpec,
    build_encoder,
    check_backbone,
    check_channels,
    check_freeze,
    check_input,
    check_weights_spec,
    load_model_checkpoint,
)
from .output import ModelOutput

POOLINGS = ("avg", "max")


@dataclass
class BaselineConfig:
    """ResNet classifier. ``weights``/``pretrain``/``freeze`` behave as in ``PylonConfig``."""

    n_in: int = 1
    n_out: int = 1
    backbone: str = "resnet50"
    weights: WeightsSpec = None
    pooling: str = "avg"
    freeze: Optional[str] = None
    pretrain: Optional[str] = None

    def __post_init__(self) -> None:
        check_channels(self.n_in, self.n_out)
        check_backbone(self.backbone)
        check_weights_spec(self.weights)
        check_freeze(self.freeze)
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling={self.pooling!r} is not supported; use one of {list(POOLINGS)}")

    def make_model(self) -> "BaselineClassifier":
        return BaselineClassifier(self)


class BaselineClassifier(EncoderModel):
    """``forward(x)`` -> ``ModelOutput(logits (N, n_out), heatmap = CAM (N, n_out, H/32, W/32))``."""

    def __init__(self, conf: BaselineConfig):
        super().__init__()
        self.conf = conf
        self.pooling = conf.pooling
        weights = None if conf.pretrain is not None else conf.weights
        self.encoder = build_encoder(conf.backbone, conf.n_in, weights)
        self.fc = nn.Linear(self.encoder.out_channels[-1], conf.n_out)
        if conf.pretrain is not None:
            load_model_checkpoint(self, conf.pretrain)
        if conf.freeze == "enc":
            self.freeze_encoder()

    @property
    def target_layer(self) -> nn.Module:
        """The last feature block (ResNet ``layer4``), for Grad-CAM."""
        return self.encoder.layer4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``target_layer``: (N, C, H/32, W/32)."""
        check_input(x, self.conf.n_in)
        return self.encoder(x)[-1]

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """The linear layer applied at each location: (N, n_out, h, w)."""
        return F.conv2d(features, self.fc.weight[:, :, None, None], self.fc.bias)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feats = self.features(x)
        heatmap = self.cam(feats).float()
        if self.pooling == "avg":
            logits = self.fc(feats.mean(dim=(-2, -1))).float()
        else:
            logits = heatmap.amax(dim=(-2, -1))
        return ModelOutput(logits=logits, heatmap=heatmap)

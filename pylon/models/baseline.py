"""Baseline: an encoder, global pooling and a linear layer; its heatmap is the class
activation map (CAM, Zhou et al. 2016), the linear layer applied at every location of the
last feature map (1/32 of the input; 1/16 with ``encoder_depth`` 4).

``pooling='avg'`` (the usual classifier): ``logits = fc(mean of features)``, which equals
``heatmap.mean((-2, -1))`` since the layer is linear. ``'max'`` (the PYLON paper's max-pool
baseline): ``logits = heatmap.amax((-2, -1))``, like PYLON at 1/32 without a decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import EncoderModel, ModelOutput, WeightsSpec


@dataclass
class BaselineConfig:
    """Encoder + linear classifier; ``weights``/``pretrain``/``freeze`` as in ``PylonConfig``."""

    n_in: int = 1
    n_out: int = 1
    backbone: str = "resnet50"
    encoder_depth: int = 5
    weights: WeightsSpec = None
    pooling: str = "avg"  # 'avg' or 'max'
    freeze: Optional[str] = None
    pretrain: Optional[str] = None

    def make_model(self) -> "BaselineClassifier":
        return BaselineClassifier(self)


class BaselineClassifier(EncoderModel):
    """``forward(x)`` -> ``ModelOutput(logits (N, n_out), heatmap = CAM (N, n_out, H/32, W/32))``."""

    head_prefixes = ("fc.",)

    def build_head(self, conf: BaselineConfig) -> None:
        self.fc = nn.Linear(self.encoder.out_channels[-1], conf.n_out)
        # The deepest feature map passes through this parameter-free module: what Grad-CAM
        # hooks, for any encoder, without changing the checkpoint's keys.
        self.target_layer = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last feature map, (N, C, H/32, W/32) at depth 5."""
        return self.target_layer(self.encoder(x)[-1])

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feats = self.features(x)
        # The classifier runs in float32 even under autocast, as PYLON's head does (bf16 CAMs tie).
        with torch.autocast(x.device.type, enabled=False):
            feats = feats.float()
            heatmap = F.conv2d(feats, self.fc.weight[:, :, None, None], self.fc.bias)  # fc at each location
            logits = self.fc(feats.mean(dim=(-2, -1))) if self.conf.pooling == "avg" else heatmap.amax(dim=(-2, -1))
        return ModelOutput(logits=logits, heatmap=heatmap)

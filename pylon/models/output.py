"""The one output type every classifier in the project returns."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    """What a forward pass gives back.

    ``logits``: (N, n_out) class logits.
    ``heatmap``: (N, n_out, h, w) raw per-pixel logits (apply sigmoid for probabilities).
    For PYLON, ``logits == heatmap.amax((-2, -1))``; for baselines the heatmap is the CAM.
    """

    logits: torch.Tensor
    heatmap: torch.Tensor

"""Several trained models of one recipe as one model: the k fold models of a cross-validation,
scored on data outside the folds. Its probability is the members' mean probability; its
heatmaps (``pylon.heatmaps``) are the members' mean maps."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .backbone import ModelOutput


def _mean_probability_logit(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    # float64: a float32 logit of a mean probability near 1 would round to a few values and tie
    mean = torch.stack([torch.sigmoid(x.double()) for x in logits]).mean(0)
    return torch.logit(mean, eps=1e-15).float()


class Ensemble(nn.Module):
    """``members``: models of one architecture, each returning ``ModelOutput``."""

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

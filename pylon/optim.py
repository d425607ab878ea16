"""The loss, optimizer and learning-rate schedule that ``train.*`` configures, for the engine and the tools."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def build_loss(cfg_train: Any, train_prevalence: float, device: torch.device) -> nn.Module:
    """BCE on the logits; ``train.pos_weight='auto'``: the training split's negatives per positive."""
    pos_weight = cfg_train.pos_weight
    if pos_weight == "auto":  # both classes are there: setup refuses a one-class training split
        pos_weight = (1 - train_prevalence) / train_prevalence
    return nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else torch.tensor([float(pos_weight)], device=device))


def build_optimizer(model: nn.Module, cfg_train: Any) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg_train.optimizer]
    return kind(model.parameters(), lr=cfg_train.lr, weight_decay=cfg_train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg_train: Any) -> Optional[Any]:
    if cfg_train.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg_train.plateau_factor, patience=cfg_train.plateau_patience)
    if cfg_train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg_train.epochs, eta_min=cfg_train.min_lr)
    return None


def step_scheduler(scheduler: Optional[Any], select: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(select)
    elif scheduler is not None:
        scheduler.step()

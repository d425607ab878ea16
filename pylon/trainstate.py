"""A training run's bookkeeping beneath ``engine``'s loop: ``LoopState`` and its stop rules, ``restore``
from last.pt, the loss checks, the val loss that selects best.pt, the history row and the summary."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pylon import PylonError
from pylon.checkpoint import CheckpointError, load_weights
from pylon.runs import RunPaths

ALL_EPOCHS_DONE = "all epochs done"
PRUNED = "stopped by the sweep's pruner"  # fit(on_epoch=...) returned True
SUMMARY_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "n")
MAX_LOSS = 1e4  # a mean BCE this large means logits in the thousands: the weights have blown up


class TrainingDiverged(PylonError, RuntimeError):
    """The loss became NaN, infinite or far beyond any working BCE value; the last good checkpoint is kept."""


def check_loss(value: float, where: str, last_good: str) -> float:
    """``value``, unless it is NaN, infinite or beyond ``MAX_LOSS``: then the run stops."""
    if not value <= MAX_LOSS:  # also catches NaN
        raise TrainingDiverged(f"the {where} loss became {value:.4g}; training stopped. The last good checkpoint "
                               f"is {last_good}. Try a lower train.lr, train.grad_clip=1.0, or check data.mean/std.")
    return value


@dataclass
class EpochLosses:
    """One epoch's training losses. They stay on the device until they are logged or the epoch
    ends; then every loss since the last read crosses in one transfer and is checked, so a
    diverged loss still names its step, and stops the run before the epoch's checkpoints."""

    epoch: int
    last_good: str
    steps: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (loss on the device, images) per step
    values: list[float] = field(default_factory=list)  # the losses read so far, each checked

    def read(self) -> float:
        """The latest step's loss, once every loss since the last read passed ``check_loss``."""
        unread = [loss for loss, _ in self.steps[len(self.values):]]
        for value in torch.stack(unread).tolist() if unread else []:
            where = f"training (epoch {self.epoch + 1}, step {len(self.values) + 1})"
            self.values.append(check_loss(value, where, self.last_good))
        return self.values[-1]

    def mean(self) -> float:
        """The epoch's loss per image."""
        self.read()
        images = [n for _, n in self.steps]
        return sum(value * n for value, n in zip(self.values, images)) / sum(images)


def selection_loss(val: dict[str, Any], select_on: str) -> float:
    """The val loss ``train.select_on`` names: it chooses best.pt, drives early stopping and the
    plateau scheduler. ``mean_sources`` weighs every source alike, however many images each has."""
    if select_on == "pooled":
        return val["loss"]
    if select_on == "mean_sources":
        return float(np.mean(list(val["source_losses"].values())))
    return val["source_losses"][select_on]


@dataclass
class LoopState:
    """A run's progress; stored in last.pt so that resume continues exactly."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    stop_reason: Optional[str] = None
    best_metrics: dict = field(default_factory=dict)

    def record(self, epoch: int, select: float, metrics: dict, cfg_train: Any, lr: float) -> bool:
        """Epoch ``epoch`` (from 0) scored ``select`` (train.select_on's val loss): the best so far,
        patience and the stop rules (``lr``: after the scheduler's step); whether it improved."""
        self.epoch = epoch + 1
        improved = select < self.best_val_loss
        self.epochs_without_improvement = 0 if improved else self.epochs_without_improvement + 1
        if improved:
            self.best_val_loss, self.best_epoch = select, epoch + 1
            self.best_metrics = {k: metrics[k] for k in SUMMARY_METRICS}
        if cfg_train.early_stop_patience and self.epochs_without_improvement >= cfg_train.early_stop_patience:
            self.stop_reason = f"early stop: no val-loss improvement for {self.epochs_without_improvement} epochs"
        elif cfg_train.scheduler == "plateau" and epoch + 1 >= cfg_train.warmup_epochs and lr < cfg_train.min_lr:
            self.stop_reason = f"learning rate {lr:.1e} fell below train.min_lr={cfg_train.min_lr:.1e}"
        elif self.epoch >= cfg_train.epochs:
            self.stop_reason = ALL_EPOCHS_DONE
        return improved

    def last_good(self, last: Path) -> str:
        """The checkpoint a diverged epoch leaves behind (``last``: the run's last.pt), for its message."""
        return f"{last} (epoch {self.epoch})" if self.epoch else "none yet (no epoch finished)"

    def finished(self, epochs: int) -> Optional[str]:
        """Why a run in this state has nothing left to train for ``train.epochs=epochs``; None if it has."""
        if self.stop_reason is not None and self.stop_reason != ALL_EPOCHS_DONE:
            return f"it stopped early ({self.stop_reason})"
        if self.epoch >= epochs:
            return (f"it has completed {self.epoch} epochs and train.epochs={epochs}; "
                    f"to train longer: --resume RUN --set train.epochs={self.epoch + 1} (or more)")
        return None


def restore(saved: dict, path: Path, cfg_train: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Optional[Any], scaler: torch.amp.GradScaler) -> LoopState:
    try:
        load_weights(model, saved["model"], str(path))
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if target is not None and saved[name]:  # {}: a run without an fp16 scaler resumed with one
                target.load_state_dict(saved[name])
        if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            scheduler.T_max = cfg_train.epochs  # raised for this resume: anneal to the new end, never back up
        return LoopState(**saved["loop"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a training checkpoint of this config ({err})") from None


def history_row(train_loss: float, val: dict[str, Any], metrics: dict[str, Any], lr: float, seconds: float,
                train_prevalence: float, select_on: str) -> dict[str, Any]:
    """An epoch's line of history.csv and W&B: its losses, val metrics, rate and time."""
    return {"train_loss": train_loss, "val_loss": val["loss"], "val_auroc": metrics["auroc"],
            "val_accuracy": metrics["accuracy"], "val_sensitivity": metrics["sensitivity"],
            "val_specificity": metrics["specificity"], "lr": lr, "epoch_seconds": seconds,
            "train_prevalence": train_prevalence, **{f"val_loss_{k}": v for k, v in val["source_losses"].items()},
            "val_select_loss": selection_loss(val, select_on)}


def summary(run: RunPaths, state: LoopState, wandb_note: Optional[str], started: float,
            note: Optional[str] = None) -> dict[str, Any]:
    """What ``fit`` returns (and train.py prints): where the run is, how it ended and its best epoch."""
    return {
        "run": str(run.root), "stop_reason": state.stop_reason, "epochs": state.epoch,
        "global_step": state.global_step, "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
        **{f"best_val_{k}": state.best_metrics[k] for k in SUMMARY_METRICS if k in state.best_metrics},
        "minutes": round((time.time() - started) / 60, 3),
        "best_checkpoint": str(run.best), "last_checkpoint": str(run.last), "history": str(run.history),
        **({"wandb": wandb_note} if wandb_note else {}), **({"note": note} if note else {}),
    }

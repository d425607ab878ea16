"""Training: the epoch loop, validation, checkpoints, early stopping and DDP.

``fit`` is the whole of ``train.py``'s work. Each epoch's data order and augmentation are a
function of (seed, epoch) only, and ``last.pt`` is written at epoch boundaries, so a resumed
run repeats exactly what the uninterrupted run would have done.

Order of work, chosen so that mistakes surface before anything slow or anything written:
check the config, build the model (missing pretrained weights fail here), read the resume
checkpoint (unsafe or damaged files are refused here), prepare the data (rank 0 first, so
the cache is built once), and only then create the run folder.

Several processes (torchrun): every process trains on its own shard with ``batch_size /
world_size`` images per step; validation shards the rows without padding and gathers the
predictions; only rank 0 writes files and talks to W&B.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pylon.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, training_state
from pylon.config import ConfigError, to_dict, to_yaml
from pylon.data.pipeline import PreparedData, split_loader, prepare_data, set_loader_epoch, train_prevalence
from pylon.heatmaps import box_prior, heatmaps, methods_for
from pylon.metrics import classification_metrics, youden_threshold
from pylon.models import build_model_from_config
from pylon.runs import RunPaths, new_run
from pylon.tracking import Tracker

log = logging.getLogger(__name__)
T = TypeVar("T")

ALL_EPOCHS_DONE = "all epochs done"
# Validation metrics worth carrying into the summary (the confusion counts are in history/W&B).
SUMMARY_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "n")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={preference} but CUDA is not available here; use train.device=auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_preference: str) -> Dist:
    """Single process, or one process of a torchrun launch (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=resolve_device(device_preference))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group (torch warns at exit about one left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or the only process; usable before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def gather(obj: Any, d: Dist) -> list[Any]:
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def main_first(d: Dist, build: Callable[[], T]) -> T:
    """Run ``build`` on rank 0, then on the other processes.

    Used for the data: rank 0 generates/indexes/caches once and the others then find the
    finished cache. A failure on rank 0 is passed on, so no process waits forever.
    """
    if d.world_size == 1:
        return build()
    result: Optional[T] = None
    failure: Optional[BaseException] = None
    if d.is_main:
        try:
            result = build()
        except Exception as exc:  # re-raised below, after telling the other processes
            failure = exc
    message = [None if failure is None else (isinstance(failure, ConfigError), str(failure))]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        user_error, text = message[0]
        raise (ConfigError if user_error else RuntimeError)(f"rank 0 failed: {text}")
    return result if d.is_main else build()


def broadcast_buffers(model: nn.Module, d: Dist) -> None:
    """Give every process rank 0's BatchNorm statistics.

    Each process updates its running statistics from its own batches, so they drift apart
    within an epoch; rank 0's are the ones saved, so they are the ones validated.
    """
    if d.world_size == 1:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def amp_dtype(device: torch.device, train_cfg: Any) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision (always on CPU)."""
    if device.type != "cuda" or not train_cfg.amp:
        return None
    if train_cfg.amp_dtype == "fp16" or (train_cfg.amp_dtype == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Optimisation pieces


def check_train_config(cfg: Any, world_size: int) -> None:
    """Combinations the typed config cannot reject on its own; checked before any work."""
    t = cfg.train
    if t.batch_size % world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {world_size} processes")
    if t.early_stop_patience is not None and t.early_stop_patience < 1:
        raise ConfigError(f"train.early_stop_patience must be at least 1 or null, got {t.early_stop_patience}")
    if t.freeze_encoder_epochs < 0:
        raise ConfigError(f"train.freeze_encoder_epochs must be 0 or more, got {t.freeze_encoder_epochs}")
    if t.freeze_encoder_epochs and cfg.model.freeze == "enc":
        raise ConfigError("train.freeze_encoder_epochs and model.freeze=enc both freeze the encoder: use one")
    if t.max_steps_per_epoch is not None and t.max_steps_per_epoch < 1:
        raise ConfigError(f"train.max_steps_per_epoch must be at least 1 or null, got {t.max_steps_per_epoch}")
    if t.scheduler == "plateau" and t.lr < t.min_lr:
        raise ConfigError(f"train.lr={t.lr} is already below train.min_lr={t.min_lr}: the run would stop after one epoch")
    if cfg.data.balanced_sampler and world_size > 1:
        raise ConfigError("data.balanced_sampler is not supported with several processes yet")
    if cfg.logging.log_every_steps < 1:
        raise ConfigError(f"logging.log_every_steps must be at least 1, got {cfg.logging.log_every_steps}")


def build_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[train_cfg.optimizer]
    return kind(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Any) -> Optional[Any]:
    if train_cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=train_cfg.plateau_factor, patience=train_cfg.plateau_patience
        )
    if train_cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_cfg.epochs, eta_min=train_cfg.min_lr)
    return None


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def resolve_pos_weight(setting: Any, data: PreparedData) -> Optional[float]:
    if setting is None:
        return None
    if setting == "auto":
        p = train_prevalence(data)
        if not 0 < p < 1:
            raise ConfigError(f"train.pos_weight=auto needs both classes in the training split (prevalence {p:.3f})")
        return (1 - p) / p
    return float(setting)


def set_encoder_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze or release the encoder: its weights and its BatchNorm statistics.

    The models keep a frozen encoder in eval mode (see ``EncoderModel.train``), so stage one
    of ``train.freeze_encoder_epochs`` leaves the encoder exactly as it started.
    """
    model.frozen_encoder = frozen
    model.encoder.requires_grad_(not frozen)


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------
# One pass over the data


@dataclass
class LoopState:
    """Everything about a run's progress that resume must restore."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    stop_reason: Optional[str] = None
    best_metrics: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, loop: dict) -> "LoopState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in loop.items() if k in known})


def _require_finite(value: float, where: str, last: str) -> float:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"the {where} loss became {value}; training stopped. The last good checkpoint is "
            f"{last}. Try a lower train.lr, train.grad_clip=1.0, or check data.mean/data.std."
        )
    return value


def _check_finite(loss: torch.Tensor, d: Dist, where: str, last: str) -> float:
    value = loss.detach()
    if d.world_size > 1:
        # Every process must agree, or one would stop while the others wait for it.
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world_size
    return _require_finite(float(value), where, last)


def _batch_bar_disabled(progress: bool, is_main: bool) -> Optional[bool]:
    """Per-batch bars only on a terminal (None = tqdm's own check): in a log file every refresh
    would be a line, and the per-epoch line already says how the run goes."""
    return None if progress and is_main else True


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
               scaler: torch.amp.GradScaler, d: Dist, train_cfg: Any, where: str, last_checkpoint: str) -> float:
    """One optimizer step on one batch (autocast, channels_last, clipping as configured); the loss."""
    images = batch["image"].to(d.device, non_blocking=True)
    if train_cfg.channels_last and d.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(d.device, non_blocking=True)
    with autocast(d.device, amp_dtype(d.device, train_cfg)):
        logits = model(images).logits
    loss = loss_fn(logits.float(), labels)
    # Checked before the step, so the weights that produced a NaN are never saved.
    value = _check_finite(loss, d, where, last_checkpoint)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if train_cfg.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return value


def train_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    scaler: torch.amp.GradScaler,
    d: Dist,
    train_cfg: Any,
    state: LoopState,
    tracker: Tracker,
    log_every: int,
    last_checkpoint: str,
    progress: bool = True,
) -> float:
    model.train()
    total, count = 0.0, 0
    steps = len(loader) if train_cfg.max_steps_per_epoch is None else min(len(loader), train_cfg.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(
            f"no training batch in an epoch: train.batch_size={train_cfg.batch_size} is larger than "
            f"the training split ({len(loader.dataset)} images per process)"
        )
    # A context manager, so that a bar cut short by an error is cleared before the error shows.
    with tqdm(total=steps, desc=f"epoch {state.epoch + 1} train", leave=False,
              disable=_batch_bar_disabled(progress, d.is_main)) as bar:
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            value = train_step(model, batch, optimizer, loss_fn, scaler, d, train_cfg,
                               f"training (epoch {state.epoch + 1}, step {step + 1})", last_checkpoint)
            state.global_step += 1
            n = len(batch["label"])
            total += value * n
            count += n
            lr = current_lr(optimizer)
            if state.global_step % log_every == 0:
                tracker.log_step(state.global_step, **{"train/loss": value, "train/lr": lr})
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            bar.update()
    return total / count


@torch.no_grad()
def predict(model: nn.Module, loader: Any, d: Dist, train_cfg: Any, loss_fn: nn.Module, desc: str,
            progress: bool = True) -> dict[str, Any]:
    """Loss, labels, probabilities and cache rows over a loader, gathered from every process.

    Pass the plain model, not the DDP wrapper: the processes hold different numbers of
    batches, and DDP's forward may talk to the other processes.
    """
    model.eval()
    dtype = amp_dtype(d.device, train_cfg)
    loss_sum, labels, probs, rows = 0.0, [], [], []
    with tqdm(loader, desc=desc, leave=False, disable=_batch_bar_disabled(progress, d.is_main)) as batches:
        for batch in batches:
            images = batch["image"].to(d.device, non_blocking=True)
            target = batch["label"].to(d.device)
            with autocast(d.device, dtype):
                logits = model(images).logits.float()
            loss_sum += float(loss_fn(logits, target)) * len(target)
            labels.append(target[:, 0].cpu().numpy())
            probs.append(torch.sigmoid(logits[:, 0]).cpu().numpy())
            rows.append(np.asarray(batch["row"]))
    parts = gather((loss_sum, labels, probs, rows), d)

    def joined(i: int) -> np.ndarray:
        arrays = [a for part in parts for a in part[i]]
        return np.concatenate(arrays) if arrays else np.array([])

    n = sum(len(a) for part in parts for a in part[1])
    return {
        "loss": sum(part[0] for part in parts) / max(n, 1),
        "labels": joined(1).astype(np.int64),
        "probs": joined(2),
        "rows": joined(3).astype(np.int64),
    }


def validation_images(model: nn.Module, data: PreparedData, data_cfg: Any, n: int, d: Dist) -> list[tuple]:
    """A few val images (boxed ones first) with the model's native heatmap, for the dashboard."""
    if n <= 0:
        return []
    from pylon.data.transforms import eval_transform

    rows = data.rows["val"]
    boxed = [r for r in rows if len(data.cache.records[r].boxes)]
    positives = [r for r in rows if data.cache.records[r].label == 1 and r not in boxed]
    chosen = list(dict.fromkeys(boxed + positives + list(rows)))[:n]
    transform = eval_transform(data_cfg.image_size, mean=data.mean, std=data.std)
    images = [data.cache.image(r) for r in chosen]
    batch = torch.stack([transform(image=img)["image"] for img in images]).to(d.device)
    core = unwrap(model)
    maps = heatmaps(core, batch, methods_for(core)[0]).float().cpu().numpy()
    items = []
    for r, img, hm in zip(chosen, images, maps):
        rec = data.cache.records[r]
        boxes = [tuple(b) for b in data.cache.boxes_in_cache_frame(r)]
        items.append((img, hm, boxes, f"{rec.source} {rec.id} label={rec.label}"))
    return items


# ---------------------------------------------------------------------------------------------
# The run


def _agree_on_run(run: Optional[RunPaths], cfg: Any, d: Dist) -> RunPaths:
    """Rank 0 creates (or names) the run folder; every process uses rank 0's answer."""
    root = None
    if d.is_main:
        root = str((run or new_run(cfg.logging.runs_dir, cfg.name)).root)
    return RunPaths(Path(gather(root, d)[0]))


def _finished_already(state: LoopState, cfg: Any) -> Optional[str]:
    """Why a resumed run has nothing left to do, or None when it should continue."""
    if state.stop_reason is not None and state.stop_reason != ALL_EPOCHS_DONE:
        return f"it stopped early ({state.stop_reason})"
    if state.epoch >= cfg.train.epochs:
        return (f"it has completed {state.epoch} epochs and train.epochs={cfg.train.epochs}; "
                f"to train longer: --resume RUN --set train.epochs={state.epoch + 1} (or more)")
    return None


def _summary(run: RunPaths, state: LoopState, tracker: Optional[Tracker], started: float,
             note: Optional[str] = None) -> dict[str, Any]:
    best = {f"best_val_{k}": state.best_metrics.get(k) for k in SUMMARY_METRICS if k in state.best_metrics}
    summary: dict[str, Any] = {
        "run": str(run.root),
        "stop_reason": state.stop_reason,
        "epochs": state.epoch,
        "global_step": state.global_step,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        **best,
        "minutes": round((time.time() - started) / 60, 3),
        "best_checkpoint": str(run.best),
        "last_checkpoint": str(run.last),
        "history": str(run.history),
    }
    if tracker is not None and tracker.wandb_dir is not None:
        summary["wandb_mode"] = tracker.mode
        summary["wandb_dir"] = str(tracker.wandb_dir)
    if note:
        summary["note"] = note
    return summary


def fit(cfg: Any, run: Optional[RunPaths] = None, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` and return the summary printed at the end.

    ``run`` None starts a new run folder under ``logging.runs_dir``; with ``resume=True``,
    ``run`` is the folder to continue from its ``checkpoints/last.pt``. A resumed run whose
    ``train.epochs`` was raised continues; one that stopped early says so and returns.
    """
    started = time.time()
    d = init_distributed(cfg.train.device)
    check_train_config(cfg, d.world_size)
    if resume and run is None:
        raise ValueError("fit(resume=True) needs the run folder to resume")
    if resume and not run.last.is_file():
        raise ConfigError(f"{run.root} has no checkpoints/last.pt to resume from (no epoch of it finished)")
    seed_everything(cfg.train.seed)
    # The model first: missing pretrained weights should fail before a long cache build.
    model = build_model_from_config(cfg.model).to(d.device)
    # Likewise a checkpoint that cannot be resumed from (missing, damaged, unsafe).
    saved = load_checkpoint(run.last, map_location="cpu") if resume else None
    data = main_first(d, lambda: prepare_data(cfg.data, progress=progress and d.is_main))
    if d.is_main and progress:
        print(f"data: {data.summary()}", flush=True)
    if cfg.train.channels_last and d.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    dtype = amp_dtype(d.device, cfg.train)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    pos_weight = resolve_pos_weight(cfg.train.pos_weight, data)
    loss_fn = nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor([pos_weight], device=d.device)
    )

    state = LoopState()
    if saved is not None:
        loop = restore_training_state(
            saved, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, origin=str(run.last)
        )
        state = LoopState.from_checkpoint(loop)
        why_not = _finished_already(state, cfg)
        if why_not is not None:
            note = f"nothing to resume in {run.root}: {why_not}"
            if d.is_main:
                print(note, flush=True)
            return _summary(run, state, None, started, note)
        state.stop_reason = None  # a finished run whose train.epochs was raised goes on

    run = _agree_on_run(run, cfg, d)
    if d.is_main:
        # Written once the resume state has been accepted: a failed resume leaves it alone.
        run.config.write_text(to_yaml(cfg))

    per_process_batch = cfg.train.batch_size // d.world_size
    train_loader = split_loader(
        data, "train", cfg.data, per_process_batch, train=True, seed=cfg.train.seed, rank=d.rank, world_size=d.world_size
    )
    val_loader = split_loader(data, "val", cfg.data, cfg.eval.batch_size, train=False, rank=d.rank, world_size=d.world_size)
    tracker = Tracker(
        run.root,
        project=cfg.logging.project,
        run_name=run.root.name,
        config=to_dict(cfg),
        mode=cfg.logging.wandb_mode,
        entity=cfg.logging.entity,
        rank=d.rank,
        resume=resume,
    )
    try:
        _train(cfg, run, d, model, data, optimizer, scheduler, scaler, loss_fn, state, tracker,
               train_loader, val_loader, progress)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    summary = _summary(run, state, tracker, started)
    if d.is_main:
        tracker.summary(**{k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        if run.best.exists():
            tracker.log_artifact(run.best, name=f"{run.root.name}-best", type="model")
    tracker.finish()
    return summary


def _youden_or_none(labels: np.ndarray, probs: np.ndarray) -> Optional[float]:
    return youden_threshold(labels, probs) if 0 < int(np.sum(labels)) < len(labels) else None


def _train(cfg, run, d, model, data, optimizer, scheduler, scaler, loss_fn, state, tracker,
           train_loader, val_loader, progress) -> None:
    """The epoch loop of ``fit``; updates ``state`` and writes checkpoints and history."""
    freeze_epochs = cfg.train.freeze_encoder_epochs

    def prepare_stage(epoch: int) -> nn.Module:
        if freeze_epochs:
            set_encoder_frozen(model, epoch < freeze_epochs)
        m = torch.compile(model) if cfg.train.compile else model
        if d.world_size > 1:
            # Rebuilt for stage two: DDP records which parameters receive gradients.
            m = DistributedDataParallel(m, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        return m

    train_model = prepare_stage(state.epoch)
    pos_prevalence = train_prevalence(data)
    config_dict = to_dict(cfg)  # stored in every checkpoint
    # Image-blind localization baseline, from the training split only; it travels with the
    # weights so that scoring the run on other data never looks at that data's boxes.
    prior = box_prior([data.cache.boxes_in_cache_frame(int(r)) for r in data.rows["train"]], data.cache.image_size)
    epochs = tqdm(desc="epochs", initial=state.epoch, total=cfg.train.epochs, disable=not (progress and d.is_main))
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            if freeze_epochs and epoch == freeze_epochs:
                # Stage two: the encoder joins, at a lower learning rate.
                train_model = prepare_stage(epoch)
                for group in optimizer.param_groups:
                    group["lr"] *= cfg.train.finetune_lr_factor
            seed_everything(cfg.train.seed * 100_003 + epoch)
            set_loader_epoch(train_loader, cfg.train.seed, epoch, d.rank)
            t0 = time.time()
            last_good = f"{run.last} (epoch {state.epoch})" if state.epoch else "none yet (no epoch finished)"
            train_loss = train_epoch(
                train_model, train_loader, optimizer, loss_fn, scaler, d, cfg.train, state, tracker,
                cfg.logging.log_every_steps, last_good, progress,
            )
            broadcast_buffers(model, d)
            val = predict(unwrap(model), val_loader, d, cfg.train, loss_fn, desc=f"epoch {epoch + 1} val",
                          progress=progress)
            _require_finite(val["loss"], f"validation (epoch {epoch + 1})", last_good)  # the same on every rank
            metrics = classification_metrics(val["labels"], val["probs"])
            lr = current_lr(optimizer)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val["loss"],
                "val_auroc": metrics["auroc"],
                "val_accuracy": metrics["accuracy"],
                "val_sensitivity": metrics["sensitivity"],
                "val_specificity": metrics["specificity"],
                "lr": lr,
                "epoch_seconds": time.time() - t0,
                "train_prevalence": pos_prevalence,
            }
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val["loss"])
            elif scheduler is not None:
                scheduler.step()
            state.epoch = epoch + 1
            improved = val["loss"] < state.best_val_loss
            if improved:
                state.best_val_loss, state.best_epoch = val["loss"], epoch + 1
                state.best_metrics = {k: metrics[k] for k in SUMMARY_METRICS}
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            patience = cfg.train.early_stop_patience
            if patience is not None and state.epochs_without_improvement >= patience:
                state.stop_reason = f"early stop: no val-loss improvement for {state.epochs_without_improvement} epochs"
            elif cfg.train.scheduler == "plateau" and current_lr(optimizer) < cfg.train.min_lr:
                state.stop_reason = f"learning rate {current_lr(optimizer):.1e} fell below train.min_lr={cfg.train.min_lr:.1e}"
            elif state.epoch >= cfg.train.epochs:
                state.stop_reason = ALL_EPOCHS_DONE

            if d.is_main:
                if improved:
                    # The normalisation travels with the weights: with data.normalize_from_train it
                    # is computed, and predict.py must not need the training data to reproduce it.
                    # So is the operating point chosen on val, for data that has no val split.
                    save_checkpoint(run.best, {"model": unwrap(model).state_dict(), "config": config_dict,
                                               "epoch": epoch + 1, "val_loss": val["loss"], "val_metrics": metrics,
                                               "normalization": {"mean": float(data.mean), "std": float(data.std)},
                                               "threshold_youden": _youden_or_none(val["labels"], val["probs"]),
                                               "prior": prior})
                save_checkpoint(run.last, training_state(model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                                                         scaler=scaler, config=config_dict, loop=vars(state)))
                tracker.log_epoch(epoch + 1, row, step=state.global_step)
                if tracker.active:
                    images = validation_images(model, data, cfg.data, cfg.logging.n_val_images, d)
                    tracker.log_images("val/heatmaps", images, step=state.global_step)
                epochs.set_postfix(val_loss=f"{val['loss']:.4f}", auroc=f"{metrics['auroc']:.3f}", lr=f"{lr:.1e}")
                message = (f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {train_loss:.4f}, val loss "
                           f"{val['loss']:.4f}, val AUROC {metrics['auroc']:.4f}, lr {lr:.1e}{' *' if improved else ''}")
                epochs.update()
                if progress:
                    epochs.write(message)
                else:
                    log.info(message)
            if d.world_size > 1:
                dist.barrier()  # nobody starts the next epoch before rank 0 has saved this one
            if state.stop_reason:
                break
    except KeyboardInterrupt:
        if d.is_main:
            print(f"\ninterrupted in epoch {state.epoch + 1}; {run.last} holds epoch {state.epoch}", file=sys.stderr)
        raise
    finally:
        epochs.close()


def format_summary(summary: dict[str, Any]) -> str:
    """The lines train.py prints at the end: where everything is and how it went."""
    lines = []
    if summary.get("note"):
        lines.append(summary["note"])
    if summary.get("best_epoch", -1) > 0:
        auroc = summary.get("best_val_auroc")
        auroc_text = "n/a" if auroc is None or not math.isfinite(auroc) else f"{auroc:.4f}"
        lines.append(f"best epoch {summary['best_epoch']} of {summary['epochs']}: val loss "
                     f"{summary['best_val_loss']:.4f}, val AUROC {auroc_text}")
    if summary.get("stop_reason"):
        lines.append(f"stopped: {summary['stop_reason']}")
    lines.append(f"best checkpoint: {summary['best_checkpoint']}")
    lines.append(f"last checkpoint: {summary['last_checkpoint']} (resume: python train.py --resume {summary['run']})")
    lines.append(f"history: {summary['history']}")
    if summary.get("wandb_dir"):
        lines.append(f"W&B files ({summary['wandb_mode']}): {summary['wandb_dir']}")
        if summary["wandb_mode"] == "offline":
            lines.append(f"upload them with: wandb sync {summary['wandb_dir']}")
    return "\n".join(lines)

"""Training: ``fit`` runs the epoch loop, validation, checkpoints, early stopping and DDP.

An epoch's data order and augmentation are a function of (seed, epoch) only, and ``last.pt``
is written at epoch boundaries, so a resumed run repeats exactly what the uninterrupted run
would have done. Mistakes surface before anything slow or written: the resume checkpoint is read,
the model built (missing weights fail), the data prepared, and only then the run folder made.
Under torchrun every process trains on its own shard with ``batch_size / world_size`` images per
step; validation shards the rows without padding and gathers predictions; rank 0 writes.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pylon import ConfigError, PylonError
from pylon.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from pylon.config import to_dict, to_yaml
from pylon.data.pipeline import SPLITS, PreparedData, describe_draws, prepare_data, set_loader_epoch, split_loader
from pylon.heatmaps import box_prior
from pylon.device import bar_disabled, choose_precision, describe_precision, seed_everything
from pylon.distributed import Dist, broadcast_buffers, gather, init_distributed, main_first, mean_over
from pylon.inference import overlays, predict_loader
from pylon.metrics import classification_metrics, youden_threshold
from pylon.models import build_model, init_from, unwrap
from pylon.optim import build_loss, build_optimizer, build_scheduler, step_scheduler
from pylon.runs import (RunPaths, absolute_roots, check_splits, check_writable, new_run, training_lock,
                        write_splits)
from pylon.tracking import Tracker

ALL_EPOCHS_DONE = "all epochs done"
PRUNED = "stopped by the sweep's pruner"  # fit(on_epoch=...) returned True
SUMMARY_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "n")


class TrainingDiverged(PylonError, RuntimeError):
    """The loss became NaN, infinite or far beyond any working BCE value; the last good checkpoint is kept."""


# --------------------------------------------------------------------------- one epoch


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


MAX_LOSS = 1e4  # a mean BCE this large means logits in the thousands: the weights have blown up


def check_loss(value: float, where: str, last_good: str) -> float:
    """``value``, unless it is NaN, infinite or beyond ``MAX_LOSS``: then the run stops."""
    if not value <= MAX_LOSS:  # also catches NaN
        raise TrainingDiverged(f"the {where} loss became {value:.4g}; training stopped. The last good checkpoint "
                               f"is {last_good}. Try a lower train.lr, train.grad_clip=1.0, or check data.mean/std.")
    return value


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
               scaler: torch.amp.GradScaler, d: Dist, cfg_train: Any) -> torch.Tensor:
    """One optimizer step (precision and layout as ``choose_precision`` says, clipping as
    configured); the loss, averaged over processes and left on the device: reading it would
    make every step wait for the device."""
    precision = choose_precision(d.device, cfg_train)
    images = precision.layout(batch["image"].to(d.device, non_blocking=True))
    labels = batch["label"].to(d.device, non_blocking=True)
    with precision.autocast():
        logits = model(images).logits
    loss = loss_fn(logits.float(), labels)
    value = mean_over(loss.detach(), d)  # all processes must agree on stopping, or some would wait forever
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg_train.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg_train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return value


class EpochLosses:
    """One epoch's training losses. They stay on the device until they are logged or the epoch
    ends; then every loss since the last read crosses in one transfer and is checked, so a
    diverged loss still names its step, and stops the run before the epoch's checkpoints."""

    def __init__(self, epoch: int, last_good: str) -> None:
        self.epoch, self.last_good = epoch, last_good
        self.pending: list[tuple[torch.Tensor, int]] = []  # (loss, images) of the steps not read yet
        self.steps_read, self.total, self.images, self.latest = 0, 0.0, 0, math.nan

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.pending.append((loss, images))

    def read(self) -> float:
        """The latest step's loss, once every loss since the last read passed ``check_loss``."""
        if self.pending:
            values = torch.stack([loss for loss, _ in self.pending]).tolist()
            for value, (_, images) in zip(values, self.pending):
                self.steps_read += 1
                check_loss(value, f"training (epoch {self.epoch + 1}, step {self.steps_read})", self.last_good)
                self.total += value * images
                self.images += images
                self.latest = value
            self.pending = []
        return self.latest

    def mean(self) -> float:
        """The epoch's loss per image."""
        self.read()
        return self.total / self.images


def validate(model: nn.Module, loader: Any, d: Dist, cfg_train: Any, loss_fn: nn.Module, desc: str) -> dict[str, Any]:
    """Loss (pooled, and per source), labels and probabilities over the val shard of every process, gathered."""
    part = predict_loader(unwrap(model), loader, choose_precision(d.device, cfg_train), loss_fn,
                          desc=desc, progress=d.is_main)
    parts = gather(part, d)
    n = sum(len(p["labels"]) for p in parts)
    losses = np.concatenate([p["losses"] for p in parts])
    sources = np.array([loader.dataset.cache.records[r].source for p in parts for r in p["rows"]])
    return {"loss": sum(p["loss_sum"] for p in parts) / max(n, 1),
            "source_losses": {name: float(losses[sources == name].mean()) for name in sorted(set(sources))},
            "labels": np.concatenate([p["labels"] for p in parts]),
            "probs": np.concatenate([p["probs"] for p in parts])}


def selection_loss(val: dict[str, Any], select_on: str) -> float:
    """The val loss ``train.select_on`` names: it chooses best.pt, drives early stopping and the
    plateau scheduler. ``mean_sources`` weighs every source alike, however many images each has."""
    if select_on == "pooled":
        return val["loss"]
    if select_on == "mean_sources":
        return float(np.mean(list(val["source_losses"].values())))
    return val["source_losses"][select_on]


def check_selection(cfg: Any, data: PreparedData) -> None:
    """A source the selection needs must be in the val split, or its loss would not exist."""
    select_on = cfg.train.select_on
    needed = {"pooled": [], "mean_sources": list(cfg.data.sources)}.get(select_on, [select_on])
    present = {r.source for r in data.records("val")}
    missing = [name for name in needed if name not in present]
    if missing:
        raise ConfigError(f"train.select_on={select_on} needs val images of {missing}, and the val split has none; "
                          "raise data.val_fraction or choose train.select_on=pooled")


def validation_images(model: nn.Module, data: PreparedData, n: int, cfg_train: Any) -> list[tuple[np.ndarray, str]]:
    """A few val images (boxed first, then positives) overlaid with the model's own heatmap."""
    rows = list(data.rows["val"])
    records = data.cache.records
    order = sorted(rows, key=lambda r: (not records[r].scored_boxes, records[r].label != 1))[:n]
    captions = [f"{records[r].source} {records[r].id} label={records[r].label}" for r in order]
    return overlays(unwrap(model), [data.cache.image(r) for r in order],
                    [data.cache.boxes_in_cache_frame(r) for r in order], captions, data.mean, data.std,
                    choose_precision(next(model.parameters()).device, cfg_train))


# --------------------------------------------------------------------------- the run


def setup(cfg: Any, d: Dist) -> tuple[nn.Module, PreparedData, torch.optim.Optimizer, torch.amp.GradScaler, nn.Module]:
    """Model, data, optimizer, AMP scaler and loss of ``cfg``, built in the one order that makes a
    run reproducible: seed, then the model (missing pretrained weights fail before the data is
    cached), then the data (rank 0 first, so the cache is built once)."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(d.device)
    if d.is_main and model.init_note:
        print(model.init_note, flush=True)
    data = main_first(d, lambda: prepare_data(cfg.data, progress=d.is_main))
    positives, n = int(data.cache.labels[data.rows["train"]].sum()), len(data.rows["train"])
    if positives in (0, n):
        raise ConfigError(f"the training split has {positives} positive images of {n}: a classifier needs both "
                          "classes; check the labels or add data (data.sources)")
    check_selection(cfg, data)
    draws = describe_draws(data, "train", cfg.data)  # also refuses shares a split cannot meet, before any run folder
    if d.is_main:
        print(f"data: {data.summary()}", flush=True)
        print(draws, flush=True)
    precision = choose_precision(d.device, cfg.train)
    if d.is_main:
        print(f"compute: {describe_precision(precision, cfg.train)}", flush=True)
    model = precision.layout(model)
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision.needs_loss_scaling)
    return model, data, optimizer, scaler, build_loss(cfg.train, data.prevalence("train"), d.device)


def start_epoch(loader: Any, cfg_train: Any, epoch: int, rank: int = 0) -> None:
    """Reseed everything for ``epoch``: its batches and augmentations depend on (seed, epoch) only."""
    seed_everything(cfg_train.seed * 100_003 + epoch)
    set_loader_epoch(loader, cfg_train.seed, epoch, rank)


OnEpoch = Callable[[int, dict], bool]


@dataclass
class Fitting:
    """What ``fit`` builds once and its epoch loop threads through."""

    cfg: Any
    d: Dist
    run: RunPaths
    model: nn.Module  # plain: checkpoints and validation use it; training uses a stage's wrapper of it
    data: PreparedData
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any]
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    tracker: Tracker
    state: LoopState
    recorded: dict[str, Any]  # how the run computed and where its weights started: in checkpoints and W&B

    @property
    def last_good(self) -> str:
        """The checkpoint a diverged epoch leaves behind, for its message."""
        return f"{self.run.last} (epoch {self.state.epoch})" if self.state.epoch else "none yet (no epoch finished)"

    @functools.cached_property
    def prior(self) -> Optional[torch.Tensor]:
        """The image-blind localization floor, from the training split only; it travels with the weights."""
        data = self.data
        return box_prior([data.cache.boxes_in_cache_frame(int(r)) for r in data.rows["train"]], data.cache.image_size)


def fit(cfg: Any, run: Optional[RunPaths] = None, on_epoch: Optional[OnEpoch] = None) -> dict[str, Any]:
    """Train ``cfg`` into a new run folder, or continue ``run`` from its last.pt; the summary.
    ``on_epoch(epoch, history_row)`` is asked on rank 0 after each validation: True ends the run
    after that epoch like an early stop (a sweep's pruner), so the folder stays a complete run.
    The run is locked while it trains; a new run that fails before its first epoch is removed."""
    with contextlib.ExitStack() as held:  # the run's training lock, released however fit ends
        return _fit(cfg, run, on_epoch, held)


def _fit(cfg: Any, run: Optional[RunPaths], on_epoch: Optional[OnEpoch], held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.time()
    d = init_distributed(cfg.train.device)
    _check_launch(cfg, d, new=run is None)
    saved = None
    if run is not None:
        if not run.last.is_file():
            raise ConfigError(f"{run.root} has no checkpoints/last.pt to resume from (no epoch of it finished)")
        if d.is_main:
            held.enter_context(training_lock(run))  # before minutes of caching
        saved = load_checkpoint(run.last)
    model, data, optimizer, scaler, loss_fn = setup(cfg, d)
    if run is not None and run.splits.is_file():
        check_splits(run.splits, data, SPLITS, cfg.data.sources)  # resuming on other data would silently train something else
    scheduler = build_scheduler(optimizer, cfg.train)
    state = LoopState()
    if saved is not None:
        state = _restore(saved, run.last, cfg, model, optimizer, scheduler, scaler)
        why_not = _finished_already(state, cfg)
        if why_not is not None:
            return _summary(run, state, None, started, f"nothing to resume in {run.root}: {why_not}")
        state.stop_reason = None  # a finished run whose train.epochs was raised goes on

    if d.is_main and run is None:
        run = new_run(cfg.logging.runs_dir, cfg.name)
        held.enter_context(training_lock(run))
    run = RunPaths(Path(gather(str(run.root) if d.is_main else None, d)[0]))
    if d.is_main:
        run.config.write_text(to_yaml(cfg))  # written once the resume state was accepted
        write_splits(run.splits, data)
    recorded = {"precision": choose_precision(d.device, cfg.train).name, "init_from": init_from(cfg.model, model)}
    tracker = Tracker(run.root, cfg.logging, config={**to_dict(cfg), **recorded}, enabled=d.is_main,
                      run_id=None if saved is None else saved.get("wandb_run_id"))
    try:
        _epochs(Fitting(cfg, d, run, model, data, optimizer, scheduler, scaler, loss_fn, tracker, state, recorded),
                on_epoch)
    except BaseException:
        tracker.finish(exit_code=1)
        if d.is_main and not run.last.is_file():  # no epoch finished: nothing to resume or evaluate
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    summary = {**_summary(run, state, tracker, started), "select_on": cfg.train.select_on, **recorded}
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if run.best.exists():
        tracker.log_artifact(run.best, f"{run.root.name}-best")
    tracker.finish()
    return summary


def _check_launch(cfg: Any, d: Dist, new: bool) -> None:
    """What the launch and the folders must allow, checked before minutes of caching."""
    if cfg.train.batch_size % d.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {d.world_size} processes")
    if (cfg.data.balanced_sampler or cfg.data.source_shares) and d.world_size > 1:  # weighted draws are one process's
        raise ConfigError("data.balanced_sampler and data.source_shares are not supported with several processes")
    if d.is_main and new:
        check_writable(cfg.logging.runs_dir)
    if d.is_main:
        check_writable(cfg.data.cache_dir, "data.cache_dir")
    absolute_roots(cfg.data)  # the run's config must find its data from any working directory


def _restore(saved: dict, path: Path, cfg: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Optional[Any], scaler: torch.amp.GradScaler) -> LoopState:
    """Load last.pt's weights and optimizer, scheduler and scaler states; its loop state."""
    try:
        load_weights(model, saved["model"], str(path))
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if target is not None and saved[name]:  # {}: a run without an fp16 scaler resumed with one
                target.load_state_dict(saved[name])
        if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            scheduler.T_max = cfg.train.epochs  # raised for this resume: anneal to the new end, never back up
        return LoopState(**saved["loop"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a training checkpoint of this config ({err})") from None


def _record_epoch(state: LoopState, epoch: int, select: float, metrics: dict, cfg_train: Any, lr: float) -> bool:
    """``state`` once epoch ``epoch`` (from 0) scored ``select`` (train.select_on's val loss): the
    best so far, patience and the stop rules (``lr``: after the scheduler's step); whether it improved."""
    state.epoch = epoch + 1
    improved = select < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_epoch, state.epochs_without_improvement = select, epoch + 1, 0
        state.best_metrics = {k: metrics[k] for k in SUMMARY_METRICS}
    else:
        state.epochs_without_improvement += 1
    if cfg_train.early_stop_patience and state.epochs_without_improvement >= cfg_train.early_stop_patience:
        state.stop_reason = f"early stop: no val-loss improvement for {state.epochs_without_improvement} epochs"
    elif cfg_train.scheduler == "plateau" and lr < cfg_train.min_lr:
        state.stop_reason = f"learning rate {lr:.1e} fell below train.min_lr={cfg_train.min_lr:.1e}"
    elif state.epoch >= cfg_train.epochs:
        state.stop_reason = ALL_EPOCHS_DONE
    return improved


def _finished_already(state: LoopState, cfg: Any) -> Optional[str]:
    if state.stop_reason is not None and state.stop_reason != ALL_EPOCHS_DONE:
        return f"it stopped early ({state.stop_reason})"
    if state.epoch >= cfg.train.epochs:
        return (f"it has completed {state.epoch} epochs and train.epochs={cfg.train.epochs}; "
                f"to train longer: --resume RUN --set train.epochs={state.epoch + 1} (or more)")
    return None


def _summary(run: RunPaths, state: LoopState, tracker: Optional[Tracker], started: float,
             note: Optional[str] = None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "run": str(run.root), "stop_reason": state.stop_reason, "epochs": state.epoch,
        "global_step": state.global_step, "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
        **{f"best_val_{k}": state.best_metrics[k] for k in SUMMARY_METRICS if k in state.best_metrics},
        "minutes": round((time.time() - started) / 60, 3),
        "best_checkpoint": str(run.best), "last_checkpoint": str(run.last), "history": str(run.history),
    }
    if tracker is not None and tracker.note:
        summary["wandb"] = tracker.note
    if note:
        summary["note"] = note
    return summary


# --------------------------------------------------------------------------- the epoch loop


def _epochs(f: Fitting, on_epoch: Optional[OnEpoch]) -> None:
    """The epoch loop of ``fit``: train, validate, keep score, write checkpoints and history."""
    cfg, d, state = f.cfg, f.d, f.state
    batch = cfg.train.batch_size // d.world_size
    train_loader = split_loader(f.data, "train", cfg.data, batch, train=True, seed=cfg.train.seed,
                                rank=d.rank, world_size=d.world_size)
    val_loader = split_loader(f.data, "val", cfg.data, cfg.eval.batch_size, train=False, rank=d.rank,
                              world_size=d.world_size)
    train_model = _stage(f, state.epoch)
    bar = tqdm(desc="epochs", initial=state.epoch, total=cfg.train.epochs, disable=bar_disabled(d.is_main))
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            if cfg.train.freeze_encoder_epochs and epoch == cfg.train.freeze_encoder_epochs:
                train_model = _stage(f, epoch)  # stage two: the encoder joins at a lower rate
                for group in f.optimizer.param_groups:
                    group["lr"] *= cfg.train.finetune_lr_factor
            start_epoch(train_loader, cfg.train, epoch, d.rank)
            started = time.time()
            train_loss = train_one_epoch(f, train_model, train_loader)
            val, metrics, row = _validate_epoch(f, val_loader, epoch, train_loss, started)
            step_scheduler(f.scheduler, row["val_select_loss"])
            improved = _record_epoch(state, epoch, row["val_select_loss"], metrics, cfg.train,
                                     f.optimizer.param_groups[0]["lr"])
            # Asked even when a stop rule fired, so the caller sees every epoch; all ranks follow rank 0.
            if on_epoch is not None and gather(d.is_main and bool(on_epoch(epoch + 1, row)), d)[0]:
                state.stop_reason = state.stop_reason or PRUNED
            if d.is_main:
                _save_epoch(f, epoch, val, metrics, row["val_select_loss"], improved)
                _report_epoch(f, epoch, row, improved, bar)
            if d.world_size > 1:
                dist.barrier()  # nobody starts the next epoch before rank 0 has saved this one
            if state.stop_reason:
                break
    except KeyboardInterrupt:
        if d.is_main and state.epoch:
            print(f"\ninterrupted in epoch {state.epoch + 1}; {f.run.last} holds epoch {state.epoch}; "
                  f"resume with: python train.py --resume {shlex.quote(str(f.run.root))}", file=sys.stderr)
        raise
    finally:
        bar.close()


def _stage(f: Fitting, epoch: int) -> nn.Module:
    """The module that trains in ``epoch``: the model with its encoder frozen or not, compiled and
    wrapped for DDP as configured. Rebuilt per stage: DDP records which parameters get gradients."""
    if f.cfg.train.freeze_encoder_epochs:
        f.model.freeze_encoder(epoch < f.cfg.train.freeze_encoder_epochs)
    m = torch.compile(f.model) if f.cfg.train.compile else f.model
    if f.d.world_size > 1:
        m = DistributedDataParallel(m, device_ids=[f.d.device.index] if f.d.device.type == "cuda" else None)
    return m


def train_one_epoch(f: Fitting, model: nn.Module, loader: Any) -> float:
    """The optimizer steps of epoch ``f.state.epoch`` (at most train.max_steps_per_epoch) through
    ``model``, a stage's wrapper of ``f.model``; the epoch's mean training loss."""
    cfg, state = f.cfg, f.state
    model.train()
    steps = min(len(loader), cfg.train.max_steps_per_epoch or len(loader))
    if steps == 0:
        raise ConfigError(f"no training batch: train.batch_size={cfg.train.batch_size} is larger than "
                          f"the training split ({len(loader.dataset)} images per process)")
    losses = EpochLosses(state.epoch, f.last_good)
    with tqdm(total=steps, desc=f"epoch {state.epoch + 1} train", leave=False,
              disable=bar_disabled(f.d.is_main)) as bar:
        for batch in itertools.islice(loader, steps):
            losses.add(train_step(model, batch, f.optimizer, f.loss_fn, f.scaler, f.d, cfg.train), len(batch["label"]))
            state.global_step += 1
            bar.update()
            if state.global_step % cfg.logging.log_every_steps == 0:  # every rank reads, so all stop together
                loss, lr = losses.read(), f.optimizer.param_groups[0]["lr"]
                if f.d.is_main:
                    f.tracker.log({"train/loss": loss, "train/lr": lr}, state.global_step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    return losses.mean()


def _validate_epoch(f: Fitting, loader: Any, epoch: int, train_loss: float,
                    started: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Validation after epoch ``epoch`` (from 0): the gathered predictions, their metrics and the history row."""
    broadcast_buffers(unwrap(f.model), f.d)  # rank 0's BatchNorm statistics are the ones saved: validate with them
    val = validate(f.model, loader, f.d, f.cfg.train, f.loss_fn, f"epoch {epoch + 1} val")
    check_loss(val["loss"], f"validation (epoch {epoch + 1})", f.last_good)  # the same on every rank
    metrics = classification_metrics(val["labels"], val["probs"])
    row = {"train_loss": train_loss, "val_loss": val["loss"], "val_auroc": metrics["auroc"],
           "val_accuracy": metrics["accuracy"], "val_sensitivity": metrics["sensitivity"],
           "val_specificity": metrics["specificity"], "lr": f.optimizer.param_groups[0]["lr"],
           "epoch_seconds": time.time() - started, "train_prevalence": f.data.prevalence("train"),
           **{f"val_loss_{k}": v for k, v in val["source_losses"].items()},
           "val_select_loss": selection_loss(val, f.cfg.train.select_on)}
    return val, metrics, row


def _save_epoch(f: Fitting, epoch: int, val: dict[str, Any], metrics: dict[str, Any], select: float,
                improved: bool) -> None:
    """last.pt after every epoch; best.pt when the epoch improved train.select_on's val loss."""
    weights, config = unwrap(f.model).state_dict(), to_dict(f.cfg)
    if improved:
        # What evaluating or predicting needs without the training data: the input
        # normalisation, the operating point chosen on val, the box prior and the
        # loss's class weight (the val loss that chose this checkpoint used it).
        both = 0 < int(val["labels"].sum()) < len(val["labels"])
        save_checkpoint(f.run.best, {
            "model": weights, "config": config, "epoch": epoch + 1, "val_loss": val["loss"],
            "select_on": f.cfg.train.select_on, "val_select_loss": select,
            "val_metrics": metrics, "normalization": {"mean": float(f.data.mean), "std": float(f.data.std)},
            "threshold_youden": youden_threshold(val["labels"], val["probs"]) if both else None,
            "prior": f.prior, "wandb_run_id": f.tracker.id, **f.recorded,
            "pos_weight": None if f.loss_fn.pos_weight is None else float(f.loss_fn.pos_weight)})
    save_checkpoint(f.run.last, {
        "model": weights, "optimizer": f.optimizer.state_dict(),
        "scheduler": None if f.scheduler is None else f.scheduler.state_dict(),
        "scaler": f.scaler.state_dict(), "loop": asdict(f.state), "config": config,
        "wandb_run_id": f.tracker.id, **f.recorded})


def _report_epoch(f: Fitting, epoch: int, row: dict[str, Any], improved: bool, bar: tqdm) -> None:
    """The epoch's history row (history.csv, W&B), val heatmaps, progress bar and printed line."""
    cfg = f.cfg
    f.tracker.log_epoch(epoch + 1, row, f.state.global_step)
    if f.tracker.run is not None and cfg.logging.n_val_images > 0:
        f.tracker.log_images("val/heatmaps", validation_images(f.model, f.data, cfg.logging.n_val_images, cfg.train),
                             f.state.global_step)
    val_loss, auroc, lr = row["val_loss"], row["val_auroc"], row["lr"]
    bar.set_postfix(val_loss=f"{val_loss:.4f}", auroc=f"{auroc:.3f}", lr=f"{lr:.1e}")
    bar.update()
    chosen = "" if cfg.train.select_on == "pooled" else f" ({cfg.train.select_on} {row['val_select_loss']:.4f})"
    print(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {row['train_loss']:.4f}, val loss "
          f"{val_loss:.4f}{chosen}, val AUROC {auroc:.4f}, lr {lr:.1e}{' *' if improved else ''}", flush=True)

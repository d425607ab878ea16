"""Training: ``fit``'s epoch loop over ``train_one_epoch`` and ``validate``; ``trainstate`` keeps score.

An epoch's data order and augmentation depend on (seed, epoch) only and last.pt is written at epoch
ends, so a resumed run repeats the uninterrupted one exactly. Mistakes surface before the run folder
is made. Under torchrun each process trains on its own shard with ``batch_size / world_size`` images
per step; validation shards the rows without padding and gathers predictions; rank 0 writes.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pylon import ConfigError
from pylon.checkpoint import load_checkpoint, save_checkpoint
from pylon.config import to_dict, to_yaml
from pylon.data.pipeline import SPLITS, PreparedData, describe_draws, prepare_data, set_loader_epoch, split_loader
from pylon.heatmaps import box_prior
from pylon.device import bar_disabled, choose_precision, describe_precision, seed_everything
from pylon.distributed import Dist, broadcast_buffers, gather, init_distributed, main_first, mean_over
from pylon.inference import overlays, predict_loader
from pylon.metrics import classification_metrics, youden_threshold
from pylon.models import build_model, init_from, unwrap
from pylon.optim import build_loss, build_optimizer, build_scheduler, step_scheduler
from pylon.runs import RunPaths, absolute_roots, check_splits, check_writable, new_run, training_lock, write_splits
from pylon.tracking import Tracker
from pylon.trainstate import PRUNED, EpochLosses, LoopState, check_loss, history_row, restore, summary

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

    @functools.cached_property
    def prior(self) -> Optional[torch.Tensor]:
        """The image-blind localization floor, from the training split only; it travels with the weights."""
        cache = self.data.cache
        return box_prior([cache.boxes_in_cache_frame(int(r)) for r in self.data.rows["train"]], cache.image_size)


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
               scaler: torch.amp.GradScaler, d: Dist, cfg_train: Any) -> torch.Tensor:
    """One optimizer step; the loss, averaged over processes and left on the device: reading it
    would make every step wait for the device."""
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


def train_one_epoch(f: Fitting, model: nn.Module, loader: Any) -> float:
    """Epoch ``f.state.epoch``'s steps through ``model``, a stage's wrapper of ``f.model``; its mean loss."""
    cfg, state = f.cfg, f.state
    model.train()
    steps = min(len(loader), cfg.train.max_steps_per_epoch or len(loader))
    if steps == 0:
        raise ConfigError(f"no training batch: train.batch_size={cfg.train.batch_size} is larger than "
                          f"the training split ({len(loader.dataset)} images per process)")
    losses = EpochLosses(state.epoch, state.last_good(f.run.last))
    warmup_steps = round(cfg.train.warmup_epochs * steps)
    with tqdm(total=steps, desc=f"epoch {state.epoch + 1} train", leave=False,
              disable=bar_disabled(f.d.is_main)) as bar:
        for batch in itertools.islice(loader, steps):
            if state.global_step < warmup_steps:
                for group in f.optimizer.param_groups:
                    group["lr"] = cfg.train.lr * (state.global_step + 1) / warmup_steps
            loss = train_step(model, batch, f.optimizer, f.loss_fn, f.scaler, f.d, cfg.train)
            losses.steps.append((loss, len(batch["label"])))
            state.global_step += 1
            bar.update()
            if state.global_step % cfg.logging.log_every_steps == 0:  # every rank reads, so all stop together
                loss, lr = losses.read(), f.optimizer.param_groups[0]["lr"]
                if f.d.is_main:
                    f.tracker.log({"train/loss": loss, "train/lr": lr}, state.global_step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    return losses.mean()


def validate(f: Fitting, loader: Any, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The val loss (pooled and per source), labels and probabilities of every process's shard; their metrics."""
    d = f.d
    broadcast_buffers(unwrap(f.model), d)  # rank 0's BatchNorm statistics are the ones saved: validate with them
    part = predict_loader(unwrap(f.model), loader, choose_precision(d.device, f.cfg.train), f.loss_fn,
                          desc=f"epoch {epoch + 1} val", progress=d.is_main)
    parts = gather(part, d)
    labels, probs, losses = (np.concatenate([p[key] for p in parts]) for key in ("labels", "probs", "losses"))
    sources = np.array([loader.dataset.cache.records[r].source for p in parts for r in p["rows"]])
    val = {"loss": sum(p["loss_sum"] for p in parts) / max(len(labels), 1), "labels": labels, "probs": probs,
           "source_losses": {name: float(losses[sources == name].mean()) for name in sorted(set(sources))}}
    check_loss(val["loss"], f"validation (epoch {epoch + 1})", f.state.last_good(f.run.last))  # the same on every rank
    return val, classification_metrics(val["labels"], val["probs"])


def setup(cfg: Any, d: Dist) -> tuple[nn.Module, PreparedData, torch.optim.Optimizer, torch.amp.GradScaler, nn.Module]:
    """Model, data, optimizer, AMP scaler and loss, in the order that makes a run reproducible: seed,
    model (missing weights fail before the data is cached), data (rank 0 first: it builds the cache)."""
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
    precision = choose_precision(d.device, cfg.train)
    if d.is_main:
        print(f"data: {data.summary()}\n{draws}\ncompute: {describe_precision(precision, cfg.train)}", flush=True)
    model = precision.layout(model)
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision.needs_loss_scaling)
    return model, data, optimizer, scaler, build_loss(cfg.train, data.prevalence("train"), d.device)


def check_selection(cfg: Any, data: PreparedData) -> None:
    """A source the selection needs must be in the val split, or its loss would not exist."""
    select_on = cfg.train.select_on
    needed = {"pooled": [], "mean_sources": list(cfg.data.sources)}.get(select_on, [select_on])
    present = {r.source for r in data.records("val")}
    missing = [name for name in needed if name not in present]
    if missing:
        raise ConfigError(f"train.select_on={select_on} needs val images of {missing}, and the val split has none; "
                          "raise data.val_fraction or choose train.select_on=pooled")


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


def fit(cfg: Any, run: Optional[RunPaths] = None, on_epoch: Optional[OnEpoch] = None) -> dict[str, Any]:
    """Train ``cfg`` into a new run folder, or continue ``run`` from its last.pt; the summary.
    ``on_epoch(epoch, history_row)``, asked on rank 0 after each validation, returns True to end the
    run like an early stop (a sweep's pruner). A new run that fails before its first epoch is removed."""
    with contextlib.ExitStack() as held:  # the run's training lock, released however fit ends
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
            check_splits(run.splits, data, SPLITS, cfg.data.sources)  # else it would silently train on other data
        scheduler = build_scheduler(optimizer, cfg.train)
        state = LoopState()
        if saved is not None:
            state = restore(saved, run.last, cfg.train, model, optimizer, scheduler, scaler)
            if why_not := state.finished(cfg.train.epochs):
                return summary(run, state, None, started, f"nothing to resume in {run.root}: {why_not}")
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
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt) and d.is_main and state.epoch:
                print(f"\ninterrupted in epoch {state.epoch + 1}; {run.last} holds epoch {state.epoch}; "
                      f"resume with: python train.py --resume {shlex.quote(str(run.root))}", file=sys.stderr)
            tracker.finish(exit_code=1)
            if d.is_main and not run.last.is_file():  # no epoch finished: nothing to resume or evaluate
                shutil.rmtree(run.root, ignore_errors=True)
            raise
        result = {**summary(run, state, tracker.note, started), "select_on": cfg.train.select_on, **recorded}
        tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
        if run.best.exists():
            tracker.log_artifact(run.best, f"{run.root.name}-best")
        tracker.finish()
        return result


def start_epoch(loader: Any, cfg_train: Any, epoch: int, rank: int = 0) -> None:
    """Reseed for ``epoch``: its batches and augmentations depend on (seed, epoch) only."""
    seed_everything(cfg_train.seed * 100_003 + epoch)
    set_loader_epoch(loader, cfg_train.seed, epoch, rank)


def _epochs(f: Fitting, on_epoch: Optional[OnEpoch]) -> None:
    cfg, d, state = f.cfg, f.d, f.state
    batch = cfg.train.batch_size // d.world_size
    train_loader = split_loader(f.data, "train", cfg.data, batch, train=True, seed=cfg.train.seed,
                                rank=d.rank, world_size=d.world_size)
    val_loader = split_loader(f.data, "val", cfg.data, cfg.eval.batch_size, train=False, rank=d.rank,
                              world_size=d.world_size)
    train_model = _stage(f, state.epoch)
    with tqdm(desc="epochs", initial=state.epoch, total=cfg.train.epochs, disable=bar_disabled(d.is_main)) as bar:
        for epoch in range(state.epoch, cfg.train.epochs):
            if cfg.train.freeze_encoder_epochs and epoch == cfg.train.freeze_encoder_epochs:
                train_model = _stage(f, epoch)  # stage two: the encoder joins at a lower rate
                for group in f.optimizer.param_groups:
                    group["lr"] *= cfg.train.finetune_lr_factor
            start_epoch(train_loader, cfg.train, epoch, d.rank)
            started = time.time()
            train_loss = train_one_epoch(f, train_model, train_loader)
            val, metrics = validate(f, val_loader, epoch)
            row = history_row(train_loss, val, metrics, f.optimizer.param_groups[0]["lr"], time.time() - started,
                              f.data.prevalence("train"), cfg.train.select_on)
            if epoch + 1 >= cfg.train.warmup_epochs:  # the warm-up owns the rate until it ends
                step_scheduler(f.scheduler, row["val_select_loss"])
            lr = f.optimizer.param_groups[0]["lr"]  # after the scheduler's step: a plateau may have lowered it
            improved = state.record(epoch, row["val_select_loss"], metrics, cfg.train, lr)
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


def _stage(f: Fitting, epoch: int) -> nn.Module:
    """The module that trains in ``epoch``: encoder frozen or not, compiled and DDP-wrapped as configured.
    Rebuilt per stage: DDP records which parameters get gradients."""
    if f.cfg.train.freeze_encoder_epochs:
        f.model.freeze_encoder(epoch < f.cfg.train.freeze_encoder_epochs)
    m = torch.compile(f.model) if f.cfg.train.compile else f.model
    if f.d.world_size > 1:
        m = DistributedDataParallel(m, device_ids=[f.d.device.index] if f.d.device.type == "cuda" else None)
    return m


def _save_epoch(f: Fitting, epoch: int, val: dict[str, Any], metrics: dict[str, Any], select: float,
                improved: bool) -> None:
    """last.pt after every epoch (with what resuming needs); best.pt when train.select_on's val loss improved."""
    shared = {"model": unwrap(f.model).state_dict(), "config": to_dict(f.cfg), "wandb_run_id": f.tracker.id,
              **f.recorded}
    if improved:
        # What evaluating or predicting needs without the training data: the input normalisation, the operating
        # point chosen on val, the box prior and the loss's class weight (the val loss that chose this used it).
        both = 0 < int(val["labels"].sum()) < len(val["labels"])
        save_checkpoint(f.run.best, {
            **shared, "epoch": epoch + 1, "val_loss": val["loss"], "select_on": f.cfg.train.select_on,
            "val_select_loss": select, "val_metrics": metrics,
            "normalization": {"mean": float(f.data.mean), "std": float(f.data.std)},
            "threshold_youden": youden_threshold(val["labels"], val["probs"]) if both else None,
            "prior": f.prior, "pos_weight": None if f.loss_fn.pos_weight is None else float(f.loss_fn.pos_weight)})
    save_checkpoint(f.run.last, {**shared, "optimizer": f.optimizer.state_dict(), "scaler": f.scaler.state_dict(),
                                 "scheduler": f.scheduler.state_dict() if f.scheduler else None,
                                 "loop": asdict(f.state)})


def _report_epoch(f: Fitting, epoch: int, row: dict[str, Any], improved: bool, bar: tqdm) -> None:
    """The epoch's history row (history.csv, W&B), val heatmaps, progress bar and printed line."""
    cfg, cache = f.cfg, f.data.cache
    f.tracker.log_epoch(epoch + 1, row, f.state.global_step)
    if f.tracker.run is not None and cfg.logging.n_val_images > 0:  # boxed val images first, then positives
        records = cache.records
        rows = sorted(f.data.rows["val"], key=lambda r: (not records[r].scored_boxes, records[r].label != 1))
        rows = rows[:cfg.logging.n_val_images]
        captions = [f"{records[r].source} {records[r].id} label={records[r].label}" for r in rows]
        boxes = [cache.boxes_in_cache_frame(r) for r in rows]
        images = overlays(unwrap(f.model), [cache.image(r) for r in rows], boxes, captions, f.data.mean, f.data.std,
                          choose_precision(f.d.device, cfg.train))
        f.tracker.log_images("val/heatmaps", images, f.state.global_step)
    val_loss, auroc, lr = row["val_loss"], row["val_auroc"], row["lr"]
    bar.set_postfix(val_loss=f"{val_loss:.4f}", auroc=f"{auroc:.3f}", lr=f"{lr:.1e}")
    bar.update()
    chosen = "" if cfg.train.select_on == "pooled" else f" ({cfg.train.select_on} {row['val_select_loss']:.4f})"
    print(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {row['train_loss']:.4f}, val loss "
          f"{val_loss:.4f}{chosen}, val AUROC {auroc:.4f}, lr {lr:.1e}{' *' if improved else ''}", flush=True)

"""Inference: a trained run with its stored preprocessing, files as model inputs, batched
probabilities and heatmaps. Evaluation, prediction and the W&B validation images all go through
here, so a model sees its inputs one way everywhere."""
from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from pylon import ConfigError, plots
from pylon.checkpoint import load_checkpoint, load_weights
from pylon.config import apply_overrides, load_config, restrict_overrides
from pylon.data.cache import Geometry, resize_image
from pylon.data.dataset import eval_transform
from pylon.data.pipeline import PreparedData, split_loader
from pylon.data.sources import report_group
from pylon.data.readers import ImageReadError, read_image
from pylon.device import Precision, bar_disabled, choose_precision, resolve_device
from pylon.heatmaps import heatmaps, methods_for
from pylon.metrics import argmax_points, upsample
from pylon.models import Ensemble, build_model
from pylon.runs import RunPaths

# What --set may change when a trained run is evaluated; the rest is what was trained.
ALLOWED_OVERRIDES = ("eval.", "logging.", "train.device", "train.amp", "data.num_workers", "data.sources",
                     "data.cache_dir", "data.roots", "data.roots.")
MAX_OVERLAY_SIDE = 1024  # predict.py overlays of bigger originals are shrunk to this
MIN_SIDE_FRACTION = 4  # predict.py warns when an image's longer side is under 1/4 of the model's input


@torch.no_grad()
def predict_loader(model: nn.Module, loader: Any, precision: Precision,
                   loss_fn: Optional[nn.BCEWithLogitsLoss] = None, desc: str = "predict", progress: bool = True,
                   embeddings: bool = False) -> dict:
    """Labels, probabilities, cache rows and, with ``loss_fn``, each image's loss (with its
    pos_weight; a subset's mean is a source's val loss) and their sum, over a loader (plain model,
    not DDP); with ``embeddings``, also each image's deepest encoder map averaged over space."""
    model.eval()
    losses, labels, probs, rows, pooled = [], [], [], [], []
    hook = model.encoder.register_forward_hook(  # a handle removes its hook on leaving ``with``
        lambda _module, _inputs, features: pooled.append(features[-1].float().mean(dim=(-2, -1)).cpu().numpy())
    ) if embeddings else nullcontext()
    with hook:
        for batch in tqdm(loader, desc=desc, leave=False, disable=bar_disabled(progress)):
            target = batch["label"].to(precision.device)
            images = precision.layout(batch["image"].to(precision.device, non_blocking=True))
            with precision.autocast():
                logits = model(images).logits.float()
            if loss_fn is not None:
                losses.append(F.binary_cross_entropy_with_logits(logits, target, pos_weight=loss_fn.pos_weight,
                                                                 reduction="none").mean(dim=1).cpu().numpy())
            labels.append(target[:, 0].cpu().numpy())
            probs.append(torch.sigmoid(logits[:, 0]).cpu().numpy())
            rows.append(np.asarray(batch["row"]))
    join = lambda parts: np.concatenate(parts) if parts else np.array([])  # noqa: E731
    losses = join(losses).astype(np.float64)
    return {"loss_sum": float(losses.sum()), "losses": losses, "labels": join(labels).astype(np.int64),
            "probs": join(probs), "rows": join(rows).astype(np.int64),
            **({"embeddings": join(pooled).astype(np.float64)} if embeddings else {})}


@dataclass
class SplitPredictions:
    """``predict_loader`` over one split, with what each image is (read by evaluation and the embedding maps)."""

    split: str
    rows: np.ndarray  # cache rows
    labels: np.ndarray
    probs: np.ndarray
    loss: float
    sources: np.ndarray
    views: np.ndarray  # sources.report_group: the view where the source reports views, else ""
    patients: np.ndarray  # bootstrap intervals resample people, not images
    embeddings: Optional[np.ndarray] = None  # (n, channels) pooled encoder features, when asked for

    def frame(self, data: PreparedData) -> pd.DataFrame:
        return pd.DataFrame({"id": [data.cache.records[r].id for r in self.rows], "source": self.sources,
                             "view": [v or None for v in self.views], "label": self.labels, "prob": self.probs,
                             "split": self.split, "patient_id": self.patients})


def predict_split(trained: TrainedRun, data: PreparedData, split: str, embeddings: bool = False) -> SplitPredictions:
    """The run's predictions on one split of ``data``, with each image's loss at training's pos_weight."""
    if len(data.rows[split]) == 0:
        raise ConfigError(f"the {split} split is empty: nothing to evaluate")
    loader = split_loader(data, split, trained.cfg.data, trained.cfg.eval.batch_size, train=False)
    weight = trained.info.get("pos_weight")  # training's: val's loss is then the one best.pt was chosen on
    pos_weight = None if weight is None else torch.tensor([weight], device=trained.precision.device)
    out = predict_loader(trained.model, loader, trained.precision, nn.BCEWithLogitsLoss(pos_weight=pos_weight),
                         desc=f"{split} predictions", embeddings=embeddings)
    records = [data.cache.records[r] for r in out["rows"]]
    return SplitPredictions(split, out["rows"], out["labels"], out["probs"].astype(np.float64),
                            out["loss_sum"] / max(len(records), 1), np.array([r.source for r in records]),
                            np.array([report_group(r) for r in records]), np.array([r.patient_id for r in records]),
                            out.get("embeddings"))


@dataclass
class TrainedRun:
    """A run folder with its config and best model (in eval mode), and what best.pt stores beside the weights."""

    paths: RunPaths
    cfg: Any  # with the overrides it was loaded with
    trained_data: Any  # the data config it was trained on: its sources and roots, before any override
    model: nn.Module
    precision: Precision  # the device and the precision it computes at (device.choose_precision)
    mean_std: tuple[float, float]  # the input normalisation the model was trained with
    prior: Optional[torch.Tensor]  # the training boxes' prior (None if that split had no boxes)
    info: dict  # the rest of best.pt: epoch, threshold_youden, wandb_run_id, ...


def load_run(run: RunPaths, overrides: Sequence[str] = (), device: Optional[str] = None) -> TrainedRun:
    """The run's config (plus the few overrides evaluation may change) and its best checkpoint; for a
    cross-validation folder or a seed ensemble (``ensemble.json``), its runs as one ``Ensemble``."""
    if run.crossval.is_file() or run.ensemble.is_file():
        return _load_ensemble(run, overrides, device)
    restrict_overrides(list(overrides), ALLOWED_OVERRIDES, "for a trained run",
                       "train a new run to change what was trained")
    trained_cfg = load_config(run.config, stored=True)
    cfg = apply_overrides(trained_cfg, list(overrides)) if overrides else trained_cfg
    if not run.best.is_file():
        why = (f"it is missing, though {run.history.name} shows trained epochs (deleted or moved?)"
               if run.history.is_file() else "its training has not finished an epoch")
        raise ConfigError(f"{run.root} has no checkpoints/best.pt: {why}")
    state = load_checkpoint(run.best)
    stored = state.get("config", {}).get("model", {})
    ignored = {"weights", "pretrain", "freeze"}  # how training started, not what the weights are
    differ = sorted(k for k, v in OmegaConf.to_container(cfg.model).items() if k not in ignored and k in stored and stored[k] != v)
    if differ:
        raise ConfigError(f"{run.config} and {run.best} disagree on model.{', model.'.join(differ)}: "
                          "the config was edited after training; restore it to use these weights")
    # The checkpoint holds every weight: never fetch ImageNet weights or a pretrain file.
    model = build_model(OmegaConf.merge(cfg.model, {"weights": None, "pretrain": None}))
    load_weights(model, state.pop("model"), str(run.best))
    precision = choose_precision(resolve_device(device or cfg.train.device), cfg.train)
    norm = state["normalization"]
    return TrainedRun(run, cfg, trained_cfg.data, precision.layout(model.to(precision.device)).eval(), precision,
                      (float(norm["mean"]), float(norm["std"])), state.get("prior"), state)


def member_runs(folder: RunPaths) -> list[RunPaths]:
    """The trained runs an ensemble folder stands for: a cross-validation's fold runs (each fold's
    seeds, where it trained several) or a seed ensemble's runs."""
    if folder.ensemble.is_file():
        return [RunPaths(r) for r in json.loads(folder.ensemble.read_text())["runs"]]
    plan = json.loads(folder.crossval.read_text())
    missing = [f for f in range(plan["folds"]) if str(f) not in plan["runs"]]
    if missing:
        raise ConfigError(f"{folder.root}: fold(s) {missing} were never trained; finish them with "
                          f"python tools/crossval.py --resume {folder.root}")
    folds = [RunPaths(plan["runs"][str(f)]) for f in range(plan["folds"])]
    return [run for fold in folds for run in (member_runs(fold) if fold.ensemble.is_file() else [fold])]


def _load_ensemble(folder: RunPaths, overrides: Sequence[str], device: Optional[str]) -> TrainedRun:
    """An ensemble folder's runs as one model: mean probability, mean heatmaps, the mean of the
    runs' box priors and of their val-chosen thresholds."""
    members = [load_run(run, overrides, device) for run in member_runs(folder)]
    if len({m.mean_std for m in members}) > 1:
        raise ConfigError(f"{folder.root}: its runs normalise their inputs differently "
                          "(data.normalize_from_train); their models cannot share one input")
    priors, thresholds = [m.prior for m in members], [m.info.get("threshold_youden") for m in members]
    first = members[0]
    info = {"precision": first.info.get("precision"), "pos_weight": first.info.get("pos_weight"),
            "threshold_youden": None if None in thresholds else float(np.mean(thresholds)),
            "members": [str(m.paths.root) for m in members]}
    return TrainedRun(folder, first.cfg, first.trained_data, Ensemble([m.model for m in members]).eval(), first.precision,
                      first.mean_std, None if any(p is None for p in priors) else torch.stack(priors).mean(0), info)


def model_inputs(images: Sequence[np.ndarray], mean: float, std: float) -> torch.Tensor:
    """(N, 1, S, S) normalised float inputs from S x S uint8 images (already resized)."""
    transform = eval_transform(images[0].shape[0], mean=mean, std=std)
    return torch.stack([transform(image=image)["image"] for image in images])


def file_input(path: Path, trained: TrainedRun) -> tuple[np.ndarray, np.ndarray, Geometry, torch.Tensor]:
    """A file as the run's model input: (original, resized, geometry, (1, S, S) tensor).
    The resize is the cache's own, so files meet the model as the training images did."""
    original = read_image(path)
    resized, geometry = resize_image(original, int(trained.cfg.data.image_size), str(trained.cfg.data.resize))
    return original, resized, geometry, model_inputs([resized], *trained.mean_std)[0]


def probabilities(model: nn.Module, batch: torch.Tensor, precision: Precision) -> np.ndarray:
    with torch.no_grad(), precision.autocast():
        return torch.sigmoid(model(precision.layout(batch.to(precision.device))).logits[:, 0].float()).cpu().numpy()


def image_heatmaps(model: nn.Module, images: Sequence[np.ndarray], mean: float, std: float, method: str,
                   prior: Optional[torch.Tensor] = None, batch_size: int = 32,
                   precision: Optional[Precision] = None) -> np.ndarray:
    """(N, h, w) ``method`` heatmaps of S x S uint8 images (already resized), ``batch_size`` at a
    time, computed at ``precision`` (default fp32); PYLON's keep their float64."""
    if not len(images):
        return np.zeros((0, 1, 1), dtype=np.float32)
    batch = model_inputs(images, mean, std)
    return np.concatenate([heatmaps(model, part, method, prior=prior, precision=precision).numpy()
                           for part in batch.split(batch_size)])


def overlays(model: nn.Module, images: Sequence[np.ndarray], boxes: Sequence[Any], captions: Sequence[str],
             mean: float, std: float, precision: Optional[Precision] = None) -> list[tuple[np.ndarray, str]]:
    """Images with the model's own heatmap, boxes and peak drawn (the W&B validation images)."""
    if not images:
        return []
    maps = image_heatmaps(model, images, mean, std, methods_for(model)[0], precision=precision)
    points = argmax_points(maps, images[0].shape)
    return [(plots.overlay(image, heat, b, p), caption)
            for image, heat, b, p, caption in zip(images, maps, boxes, points, captions)]


@dataclass
class FilePrediction:
    """One row of predict.py's predictions.csv, in its column order (``path`` is its "file")."""

    path: str
    id: str
    probability: Optional[float] = None
    peak_x: Optional[float] = None  # the heatmap's argmax, original-image pixels
    peak_y: Optional[float] = None
    method: Optional[str] = None
    overlay: Optional[Path] = None
    error: Optional[str] = None


def predict_files(trained: TrainedRun, paths: Sequence[Path], out: Path, *, method: Optional[str] = None,
                  boxes_by_id: Optional[Mapping[str, Sequence]] = None) -> list[FilePrediction]:
    """Probability, heatmap peak and an overlay PNG per file; unreadable files are reported and
    listed with their error, and the others still processed."""
    supported = [m for m in methods_for(trained.model) if m != "prior" or trained.prior is not None]
    method = method or supported[0]
    if method not in supported:
        why = "its training split had no boxes, so it stored no prior" if method == "prior" else \
            f"not available for this {trained.cfg.model.arch} model"
        raise ConfigError(f"--method {method}: {why}; use one of {supported}")
    size, batch_size = int(trained.cfg.data.image_size), int(trained.cfg.eval.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    results, named = [], Counter()
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", leave=False, disable=bar_disabled(True)):
        loaded = []
        for path in paths[start:start + batch_size]:
            item = FilePrediction(str(path), Path(path).stem)
            results.append(item)
            try:
                loaded.append((item, *file_input(Path(path), trained)))
            except ImageReadError as err:
                item.error = str(err)
                tqdm.write(f"error: {err}", file=sys.stderr)
            else:
                h, w = loaded[-1][1].shape
                if max(h, w) * MIN_SIDE_FRACTION < size:  # blown up from a few pixels: a number, not a finding
                    tqdm.write(f"warning: {path} is {w}x{h} pixels, far smaller than the model's {size}x{size} "
                               "input; its prediction means little", file=sys.stderr)
        if not loaded:
            continue
        batch = torch.stack([entry[-1] for entry in loaded])
        probs = probabilities(trained.model, batch, trained.precision)
        maps = heatmaps(trained.model, batch, method, prior=trained.prior, precision=trained.precision)
        for (item, original, _, geometry, _), prob, heat in zip(loaded, probs, maps):
            cut, peak = _on_original(heat, geometry, size)
            item.probability, item.peak_x, item.peak_y, item.method = float(prob), float(peak[0]), float(peak[1]), method
            named[item.id] += 1  # the same stem twice: the second overlay is <id>_<method>-2.png
            suffix = f"-{named[item.id]}" if named[item.id] > 1 else ""
            item.overlay = _save_overlay(out / f"{item.id}_{method}{suffix}.png", original, cut,
                                         list((boxes_by_id or {}).get(item.id, [])), peak)
    return results


def _on_original(heatmap: torch.Tensor, geometry: Geometry, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The network-frame map cut to the part covering the original (drops letterbox padding), and
    its peak in original pixels: a peak on the padding would point outside the film."""
    full = upsample(heatmap[None], size, size)[0]  # pylon's float64 kept, as for evaluation
    x0, y0, w, h = (int(round(v)) for v in geometry.boxes_to_cache([0, 0, geometry.orig_w, geometry.orig_h])[0])
    cut = full[y0:y0 + max(1, h), x0:x0 + max(1, w)].numpy()
    return cut, geometry.points_to_original(argmax_points(cut[None], cut.shape) + [x0, y0])[0]


def _save_overlay(path: Path, image: np.ndarray, heatmap: np.ndarray, boxes: list, point: Sequence[float]) -> Path:
    scale = min(1.0, MAX_OVERLAY_SIDE / max(image.shape))
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    boxes = [[v * scale for v in b] for b in boxes]
    Image.fromarray(plots.overlay(image, heatmap, boxes, [v * scale for v in point])).save(path)
    return path

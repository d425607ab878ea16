"""Evaluate a trained run (``evaluate.py``) and apply it to single images (``predict.py``).

Evaluation rebuilds exactly the data the run was trained on (same split, same cache, same
normalisation; ``pylon.data.pipeline``), loads ``checkpoints/best.pt`` safely and writes
``<run>/eval/``:

- ``metrics.json``: ``classification`` on the evaluated split (AUROC, accuracy, sensitivity,
  specificity, precision, F1 at 0.5 and at the Youden threshold chosen on the **val**
  split's predictions, bootstrap 95% intervals, ECE), the same ``by_source`` and, for RSNA,
  ``by_view``; with localization, ``localization`` keyed by heatmap method.
- ``predictions.csv`` (val and evaluated split), ``localization.csv`` (one row per boxed
  image and method), figures (ROC, PR, confusion matrices, calibration, learning curves,
  overlay grid, failure galleries).

Localization (the README's evaluation protocol): ``point_acc`` takes the argmax of the heatmap
upsampled to the network input and counts a hit inside a box of the same (cache) frame;
``pointing_game_15px`` maps that same point into the original image through the cache
geometry and counts a hit within ``eval.pointing_tolerance_px`` of an original-frame box.
``energy_in_box`` and ``laterality_acc`` are scored on the same maps. Only images with at
least one box are scored, and the image-blind ``prior`` (stored with the run) and ``center``
baselines are always included. ``eval.split=all`` scores another data set with the run's
stored normalisation, threshold and prior.

Every metric comes from ``pylon.metrics``; the only arithmetic here is a vectorised form of
the confusion-matrix ratios, so that bootstrap intervals over thousands of resamples take
milliseconds (``test_evaluate`` checks it against ``classification_metrics``).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from pylon import plots
from pylon.checkpoint import load_checkpoint, load_model_weights
from pylon.config import ConfigError, load_config, to_dict
from pylon.data.cache import Geometry, resize_image
from pylon.data.pipeline import ALL, PreparedData, split_loader, prepare_data
from pylon.data.readers import ImageReadError, read_image
from pylon.data.records import Record
from pylon.data.transforms import eval_transform
from pylon.engine import Dist, amp_dtype, autocast, predict, resolve_device
from pylon.heatmaps import heatmaps, methods_for
from pylon.metrics import (
    argmax_points,
    auroc_rows,
    bootstrap_ci,
    classification_metrics,
    energy_in_box,
    expected_calibration_error,
    jsonable,
    laterality_hits,
    mean_rows,
    point_accuracy,
    pointing_game,
    youden_threshold,
)
from pylon.models import build_model_from_config
from pylon.runs import RunPaths

log = logging.getLogger(__name__)

# Keys --set may change at evaluation time. Everything else (model, split settings, image
# size, ...) is the run's own and changing it would evaluate something that was not trained.
ALLOWED_OVERRIDES = (
    "eval.",
    "logging.",
    "train.device",
    "train.amp",
    "data.num_workers",
    "data.sources",
    "data.cache_dir",
    "data.kaggle_root",
    "data.rsna_root",
)
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1")
POINTING_KEY = "pointing_game_15px"  # the contract's name, whatever the tolerance is set to
N_FAILURES = 16  # images per failure gallery
MAX_OVERLAY_SIDE = 1024  # predict.py overlays of bigger originals are shrunk to this


# =============================================================================== the run


@dataclass
class TrainedRun:
    """A run folder with its config and best model, ready to evaluate or predict."""

    paths: RunPaths
    cfg: Any
    model: nn.Module
    device: torch.device
    checkpoint_info: dict = field(default_factory=dict)  # best.pt without the weights

    @property
    def dist(self) -> Dist:
        return Dist(device=self.device)


def check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == allowed or key.startswith(allowed) for allowed in ALLOWED_OVERRIDES):
            raise ConfigError(
                f"--set {key}: only {', '.join(a.rstrip('.') + ('.*' if a.endswith('.') else '') for a in ALLOWED_OVERRIDES)} "
                f"can change when evaluating a trained run"
            )


def load_trained_run(run: RunPaths, overrides: Sequence[str] = (), device: Optional[str] = None) -> TrainedRun:
    """The run's resolved config (+ allowed overrides) and its best checkpoint, in eval mode."""
    check_overrides(overrides)
    cfg = load_config(run.config, list(overrides))
    if device is not None:
        cfg.train.device = device
    if not run.best.is_file():
        raise ConfigError(f"{run.root} has no checkpoints/best.pt: its training has not finished an epoch")
    state = load_checkpoint(run.best, map_location="cpu")
    _check_same_model(cfg, state, run)
    # The checkpoint holds every weight: never fetch ImageNet weights or a pretrain file.
    model_cfg = OmegaConf.merge(cfg.model, {"weights": None, "pretrain": None})
    model = build_model_from_config(model_cfg)
    load_model_weights(model, state)
    target = resolve_device(cfg.train.device)
    model = model.to(target).eval()
    info = {key: value for key, value in state.items() if key != "model"}
    return TrainedRun(run, cfg, model, target, info)


def _check_same_model(cfg: Any, state: Mapping[str, Any], run: RunPaths) -> None:
    stored = (state.get("config") or {}).get("model") if isinstance(state.get("config"), Mapping) else None
    if stored is None:
        return
    current = to_dict(cfg)["model"]
    ignored = {"weights", "pretrain", "freeze"}  # how training started, not what the weights are
    differing = sorted(k for k in set(current) | set(stored) if k not in ignored and current.get(k) != stored.get(k))
    if differing:
        raise ConfigError(
            f"{run.config} and {run.best} disagree on model.{', model.'.join(differing)}: "
            f"the config was edited after training; restore it to evaluate these weights"
        )


def stored_normalization(info: Mapping[str, Any]) -> Optional[tuple[float, float]]:
    """(mean, std) saved with the checkpoint, if the trainer stored them."""
    norm = info.get("normalization")
    if isinstance(norm, Mapping) and "mean" in norm and "std" in norm:
        return float(norm["mean"]), float(norm["std"])
    return None


def input_normalization(trained: TrainedRun) -> tuple[float, float]:
    """The (mean, std) the model's inputs were normalised with during training.

    Stored in the checkpoint when available; else the config's values, unless the run
    computed them from its training split (``data.normalize_from_train``): then they are
    recomputed from that split, which needs the training data.
    """
    stored = stored_normalization(trained.checkpoint_info)
    if stored is not None:
        return stored
    data_cfg = trained.cfg.data
    if not data_cfg.normalize_from_train:
        return float(data_cfg.mean), float(data_cfg.std)
    try:
        data = prepare_data(data_cfg, progress=False)
    except (ConfigError, OSError, ValueError) as err:
        raise ConfigError(
            f"{trained.paths.root} normalised its inputs with statistics of its training split "
            f"(data.normalize_from_train) and its checkpoint does not store them, so they must be "
            f"recomputed from the training data, which failed: {err}"
        ) from None
    return data.mean, data.std


# =============================================================================== predictions


@dataclass
class SplitPredictions:
    split: str
    records: list[Record]
    rows: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    loss: float

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "id": [r.id for r in self.records],
                "source": [r.source for r in self.records],
                "view": [r.view for r in self.records],
                "label": self.labels,
                "prob": self.probs,
                "split": self.split,
            }
        )


def predict_split(trained: TrainedRun, data: PreparedData, split: str) -> SplitPredictions:
    if len(data.rows[split]) == 0:
        raise ConfigError(f"the {split} split is empty: nothing to evaluate")
    loader = split_loader(data, split, trained.cfg.data, trained.cfg.eval.batch_size, train=False)
    out = predict(trained.model, loader, trained.dist, trained.cfg.train, nn.BCEWithLogitsLoss(), desc=f"{split} predictions")
    rows = out["rows"]
    return SplitPredictions(
        split, [data.cache.records[r] for r in rows], rows, out["labels"], out["probs"].astype(np.float64), out["loss"]
    )


# =============================================================================== classification


def threshold_metric_rows(labels: np.ndarray, preds: np.ndarray, name: str) -> np.ndarray:
    """One of ``THRESHOLD_METRICS`` for each row of (resamples, n) labels and 0/1 calls.

    The vectorised form of ``classification_metrics``' ratios for ``bootstrap_ci``;
    ``nan`` where the metric is undefined (e.g. sensitivity of a resample without positives).
    """
    y, p = np.asarray(labels).astype(bool), np.asarray(preds).astype(bool)
    tp, fp = (y & p).sum(-1), (~y & p).sum(-1)
    fn, tn = (y & ~p).sum(-1), (~y & ~p).sum(-1)
    num, den = {
        "accuracy": (tp + tn, tp + tn + fp + fn),
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "precision": (tp, tp + fp),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }[name]
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def metrics_with_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int, seed: int,
                    with_auroc: bool = True) -> dict:
    """``classification_metrics`` plus ``ci``: percentile bootstrap 95% intervals.

    Every metric's interval uses the same resamples (same seed), so they are comparable.
    """
    result = classification_metrics(labels, probs, threshold)
    if not with_auroc:
        result.pop("auroc")
    if n_boot < 1:
        return result
    calls = (np.asarray(probs) >= threshold).astype(np.int8)
    ci = {}
    if with_auroc:
        ci["auroc"] = bootstrap_ci(auroc_rows, labels, probs, n_boot=n_boot, seed=seed, vectorized=True)
    for name in THRESHOLD_METRICS:
        ci[name] = bootstrap_ci(partial(threshold_metric_rows, name=name), labels, calls,
                                n_boot=n_boot, seed=seed, vectorized=True)
    result["ci"] = {name: list(bounds) for name, bounds in ci.items()}
    return result


def group_block(labels: np.ndarray, probs: np.ndarray, youden: Optional[float], n_boot: int, seed: int) -> dict:
    """Metrics of one group at 0.5 and at the (val-chosen) Youden threshold, with ECE."""
    block = metrics_with_ci(labels, probs, 0.5, n_boot, seed)
    block["ece"] = expected_calibration_error(labels, probs)
    if youden is not None:
        block["threshold_youden"] = metrics_with_ci(labels, probs, youden, n_boot, seed, with_auroc=False)
    return block


def run_threshold(trained: TrainedRun, val: Optional[SplitPredictions]) -> tuple[Optional[float], Optional[str]]:
    """The Youden threshold chosen on the run's val split: stored with the best checkpoint by
    training, else recomputed from ``val``. (threshold, None) or (None, why there is none)."""
    if "threshold_youden" in trained.checkpoint_info:
        stored = trained.checkpoint_info["threshold_youden"]
        return (None, "no Youden threshold: the val split had one class") if stored is None else (float(stored), None)
    if val is None:
        return None, "no Youden threshold: the checkpoint does not store one and the run's val split is not evaluated"
    try:
        return youden_threshold(val.labels, val.probs), None
    except ValueError as err:
        return None, f"no Youden threshold: on the val split, {err}"


def classification_report(evaluated: SplitPredictions, youden: Optional[float], youden_note: Optional[str],
                          n_boot: int, seed: int) -> dict:
    """The ``classification`` section of metrics.json (see the module docstring)."""
    y, p = evaluated.labels, evaluated.probs
    report = {"split": evaluated.split, **group_block(y, p, youden, n_boot, seed)}
    report.update(loss=evaluated.loss, bootstrap_resamples=n_boot)
    if youden is not None:
        report["threshold_youden"] = {
            "threshold": youden,
            "chosen_on": "val",
            **report["threshold_youden"],
        }
        if evaluated.split == "val":
            report["threshold_youden"]["note"] = "chosen and evaluated on the same (val) split: optimistic"
    else:
        report["threshold_youden"] = {"threshold": None, "chosen_on": "val", "note": youden_note}

    sources = np.array([r.source for r in evaluated.records])
    report["by_source"] = {
        source: group_block(y[sources == source], p[sources == source], youden, n_boot, seed)
        for source in sorted(set(sources))
    }
    views = np.array([r.view if r.source == "rsna" and r.view else "" for r in evaluated.records])
    report["by_view"] = {
        view: group_block(y[views == view], p[views == view], youden, n_boot, seed)
        for view in sorted(set(views) - {""})
    }
    return report


# =============================================================================== localization


@dataclass
class MethodHits:
    """Per boxed image (in ``LocalizationOutcome.rows`` order) for one heatmap method."""

    points_input: list = field(default_factory=list)  # (x, y) in the network-input frame
    points_original: list = field(default_factory=list)  # (x, y) in original-image pixels
    point_acc: list = field(default_factory=list)  # bool per image
    pointing: list = field(default_factory=list)  # bool per image
    energy: list = field(default_factory=list)  # energy_in_box per image
    laterality: list = field(default_factory=list)  # 1.0 / 0.0, nan when boxes are on both sides


@dataclass
class LocalizationOutcome:
    rows: np.ndarray  # cache rows of the scored (boxed) images
    methods: list[str]
    primary: str  # the method the failure gallery shows
    tolerance_px: float
    hits: dict[str, MethodHits]
    overlay_rows: list = field(default_factory=list)  # plots.OverlayRow for the overlay grid
    # Full-length lists (one entry per scored image) for plots.plot_failure_gallery; only the
    # first N_FAILURES misses of the primary method keep their pixels, the rest are None.
    gallery: dict[str, list] = field(default_factory=dict)


def short_id(record: Record) -> str:
    """A caption-sized id: Kaggle ids are paths, RSNA ids long UUIDs."""
    return record.id.rsplit("/", 1)[-1][:14]


def resolve_methods(model: nn.Module, requested: Sequence[str], has_prior: bool = True) -> list[str]:
    """``eval.methods`` (or every supported method when empty), with the image-blind ``prior``
    (when the run has one) and ``center`` baselines always added."""
    supported = [m for m in methods_for(model) if has_prior or m != "prior"]
    if not requested:
        return supported
    unknown = [m for m in requested if m not in supported]
    if unknown:
        raise ConfigError(
            f"eval.methods: {unknown} not available for this {type(model).__name__} run; it supports {supported}"
        )
    baselines = [m for m in ("prior", "center") if m in supported]
    return list(dict.fromkeys([*requested, *baselines]))


def localize(trained: TrainedRun, data: PreparedData, split: str, methods: Sequence[str],
             probs_by_row: Mapping[int, float], prior: Optional[torch.Tensor] = None) -> LocalizationOutcome:
    """Score every method on every boxed image of ``split``, one batched pass over the images."""
    cfg, cache = trained.cfg, data.cache
    rows = np.array([r for r in data.rows[split] if len(cache.records[r].boxes)], dtype=np.int64)
    primary = next((m for m in methods if m != "center"), methods[0])
    outcome = LocalizationOutcome(rows, list(methods), primary, float(cfg.eval.pointing_tolerance_px),
                                  {m: MethodHits() for m in methods})
    if rows.size == 0:
        return outcome
    # The same loader (transform, normalisation) as classification, over the boxed rows only.
    subset = replace(data, rows={**data.rows, "localization": rows})
    loader = split_loader(subset, "localization", cfg.data, cfg.eval.batch_size, train=False)
    size = (cache.image_size, cache.image_size)
    gallery: dict[str, list] = {k: [] for k in ("images", "heatmaps", "boxes", "points", "hits", "captions")}
    n_kept_failures = 0
    for batch in tqdm(loader, desc=f"localization ({', '.join(methods)})", leave=False):
        batch_rows = [int(r) for r in batch["row"]]
        boxes_input = [cache.boxes_in_cache_frame(r) for r in batch_rows]
        boxes_original = [np.asarray(cache.records[r].boxes, dtype=np.float64) for r in batch_rows]
        maps = {}
        for method in methods:
            maps[method] = heatmaps(trained.model, batch["image"], method, prior=prior).float().numpy()
            scored = point_accuracy(maps[method], boxes_input, size, tolerance=0.0)
            original = np.concatenate([cache.to_original(r, p[None]) for r, p in zip(batch_rows, scored.points)])
            pointed = pointing_game(original, boxes_original, tolerance=outcome.tolerance_px)
            record = outcome.hits[method]
            record.points_input += scored.points.tolist()
            record.points_original += original.tolist()
            record.point_acc += scored.hits.tolist()
            record.pointing += pointed.hits.tolist()
            record.energy += energy_in_box(maps[method], boxes_input, size).tolist()
            record.laterality += laterality_hits(scored.points, boxes_input, size[1]).tolist()
        first = len(outcome.hits[methods[0]].point_acc) - len(batch_rows)
        for k, row in enumerate(batch_rows):
            index = first + k
            rec = cache.records[row]
            caption = f"{short_id(rec)} {rec.view or ''} p={probs_by_row.get(row, math.nan):.2f}"
            if len(outcome.overlay_rows) < cfg.eval.n_overlays:
                outcome.overlay_rows.append(
                    plots.OverlayRow(
                        image=cache.image(row),
                        heatmaps={m: maps[m][k] for m in methods},
                        boxes=boxes_input[k].tolist(),
                        points={m: outcome.hits[m].points_input[index] for m in methods},
                        title=caption,
                        hits={m: outcome.hits[m].point_acc[index] for m in methods},
                    )
                )
            hit = outcome.hits[primary].point_acc[index]
            keep = not hit and n_kept_failures < N_FAILURES
            n_kept_failures += keep
            gallery["images"].append(cache.image(row) if keep else None)
            gallery["heatmaps"].append(maps[primary][k] if keep else None)
            gallery["boxes"].append(boxes_input[k].tolist())
            gallery["points"].append(outcome.hits[primary].points_input[index])
            gallery["hits"].append(hit)
            gallery["captions"].append(caption)
    outcome.gallery = gallery
    return outcome


LOCALIZATION_METRICS = ("point_acc", POINTING_KEY, "energy_in_box", "laterality_acc")


def localization_block(hits: MethodHits, keep: np.ndarray, n_boot: int, seed: int) -> dict:
    """The four localization metrics of the images in ``keep`` (bool mask), with 95% intervals.

    ``n`` counts the boxed images; ``n_laterality`` those whose boxes are all on one side.
    """
    per_image = (hits.point_acc, hits.pointing, hits.energy, hits.laterality)
    values = {key: np.asarray(v, dtype=np.float64)[keep] for key, v in zip(LOCALIZATION_METRICS, per_image)}
    values["laterality_acc"] = values["laterality_acc"][np.isfinite(values["laterality_acc"])]
    entry: dict[str, Any] = {}
    for key, array in values.items():
        entry[key] = float(array.mean()) if array.size else math.nan
        if n_boot >= 1 and array.size:
            entry.setdefault("ci", {})[key] = list(bootstrap_ci(mean_rows, array, n_boot=n_boot, seed=seed, vectorized=True))
    entry["n"] = int(keep.sum())
    entry["n_laterality"] = int(values["laterality_acc"].size)
    return entry


def localization_report(outcome: LocalizationOutcome, views: Sequence[Optional[str]], n_boot: int, seed: int) -> dict:
    """The ``localization`` section of metrics.json, keyed by method; ``views`` per scored image."""
    views = np.array([v or "" for v in views])
    report = {}
    for method in outcome.methods:
        hits = outcome.hits[method]
        entry = localization_block(hits, np.ones(len(views), dtype=bool), n_boot, seed)
        entry["pointing_tolerance_px"] = outcome.tolerance_px
        entry["by_view"] = {view: localization_block(hits, views == view, n_boot, seed)
                            for view in sorted(set(views) - {""})}
        report[method] = entry
    return report


def localization_frame(outcome: LocalizationOutcome, cache: Any) -> pd.DataFrame:
    """One row per scored image and method (localization.csv)."""
    records = []
    for method in outcome.methods:
        hits = outcome.hits[method]
        for i, row in enumerate(outcome.rows):
            rec = cache.records[int(row)]
            records.append({
                "id": rec.id, "method": method,
                "point_x": hits.points_original[i][0], "point_y": hits.points_original[i][1],
                "point_x_input": hits.points_input[i][0], "point_y_input": hits.points_input[i][1],
                "point_acc_hit": bool(hits.point_acc[i]), f"{POINTING_KEY}_hit": bool(hits.pointing[i]),
                "energy_in_box": hits.energy[i], "laterality_hit": hits.laterality[i],
            })
    return pd.DataFrame(records)


# =============================================================================== figures


def classification_figures(evaluated: SplitPredictions, report: dict, history: Path, out: Path) -> list[Path]:
    y, p = evaluated.labels, evaluated.probs
    sources = np.array([r.source for r in evaluated.records])
    curves = {"all": (y, p)}
    if len(set(sources)) > 1:
        curves.update({s: (y[sources == s], p[sources == s]) for s in sorted(set(sources))})
    split = evaluated.split
    paths = [
        plots.plot_roc(curves, out / "roc.png", title=f"ROC ({split})"),
        plots.plot_pr(curves, out / "pr.png", title=f"Precision-recall ({split})"),
        plots.plot_confusion(y, (p >= 0.5).astype(int), out / "confusion.png", title=f"Confusion at 0.5 ({split})"),
    ]
    youden = report["threshold_youden"]["threshold"]
    if youden is not None:
        paths.append(plots.plot_confusion(y, (p >= youden).astype(int), out / "confusion_youden.png",
                                          title=f"Confusion at Youden {youden:.3f} ({split})"))
    paths.append(plots.plot_calibration(y, p, out / "calibration.png", title=f"Calibration ({split})"))
    if history.is_file():
        try:
            paths.append(plots.plot_learning_curves(history, out / "learning_curves.png"))
        except ValueError as err:
            log.warning("no learning curves: %s", err)
    else:
        log.warning("no learning curves: %s does not exist", history)
    return paths


def misclassified_gallery(trained: TrainedRun, data: PreparedData, evaluated: SplitPredictions,
                          threshold: float, out: Path) -> Path:
    """The most confident errors at ``threshold``, with the model's native heatmap."""
    calls = evaluated.probs >= threshold
    wrong = np.flatnonzero(calls != evaluated.labels.astype(bool))
    confidence = np.abs(evaluated.probs[wrong] - 0.5)
    chosen = wrong[np.argsort(-confidence, kind="stable")][:N_FAILURES]
    title = f"Misclassified at threshold {threshold:.3f} ({evaluated.split}, most confident first)"
    if chosen.size == 0:
        return plots.plot_failure_gallery([], [], [], [], [], out, title=title)
    cache, cfg = data.cache, trained.cfg
    method = methods_for(trained.model)[0]
    rows = evaluated.rows[chosen]
    transform = eval_transform(cache.image_size, mean=data.mean, std=data.std)
    images = [cache.image(int(r)) for r in rows]
    batch = torch.stack([transform(image=img)["image"] for img in images])
    maps = torch.cat([heatmaps(trained.model, part, method).float()
                      for part in batch.split(cfg.eval.batch_size)]).numpy()
    points = argmax_points(maps, (cache.image_size, cache.image_size))
    captions = [f"{cache.records[int(r)].source} {short_id(cache.records[int(r)])} y={int(evaluated.labels[i])} "
                f"p={evaluated.probs[i]:.2f}" for r, i in zip(rows, chosen)]
    boxes = [cache.boxes_in_cache_frame(int(r)).tolist() for r in rows]
    return plots.plot_failure_gallery(images, list(maps), boxes, list(points), [False] * len(rows), out,
                                      captions=captions, max_items=N_FAILURES, title=title)


def localization_figures(outcome: LocalizationOutcome, out: Path) -> list[Path]:
    paths = []
    if outcome.overlay_rows:
        paths.append(plots.plot_overlay_grid(
            outcome.overlay_rows, out / "overlays.png",
            title=f"Heatmaps on boxed images (green: boxes, cross: argmax; {', '.join(outcome.methods)})",
        ))
    g = outcome.gallery
    if g.get("hits"):
        paths.append(plots.plot_failure_gallery(
            g["images"], g["heatmaps"], g["boxes"], g["points"], g["hits"], out / "failures_localization.png",
            captions=g["captions"], max_items=N_FAILURES, title=f"Missed localizations ({outcome.primary}, point_acc)",
        ))
    return paths


# =============================================================================== text tables


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _fmt_ci(entry: Mapping[str, Any], key: str) -> str:
    bounds = (entry.get("ci") or {}).get(key)
    if not bounds or any(b is None or not math.isfinite(b) for b in bounds):
        return _fmt(entry.get(key))
    return f"{_fmt(entry.get(key))} [{_fmt(bounds[0])}, {_fmt(bounds[1])}]"


def classification_table(report: Mapping[str, Any]) -> str:
    youden = report["threshold_youden"].get("threshold")
    head = (f"classification on {report['split']} (n={report['n']}): AUROC with 95% CI; "
            f"acc/sens/spec/F1 at 0.5 | at the Youden threshold "
            f"{_fmt(youden)} (chosen on val)")
    header = f"{'group':<12} {'n':>5}  {'AUROC [95% CI]':<24} {'acc':>6} {'sens':>6} {'spec':>6} {'F1':>6} | " \
             f"{'acc':>6} {'sens':>6} {'spec':>6} {'F1':>6}  {'ECE':>6}"
    lines = [head, header, "-" * len(header)]
    groups = [("all", report)] + list(report["by_source"].items()) + [(f"rsna/{v}", b) for v, b in report["by_view"].items()]
    for name, block in groups:
        at_j = block.get("threshold_youden", {})
        lines.append(
            f"{name:<12} {block['n']:>5}  {_fmt_ci(block, 'auroc'):<24} "
            + " ".join(f"{_fmt(block[k]):>6}" for k in ("accuracy", "sensitivity", "specificity", "f1"))
            + " | " + " ".join(f"{_fmt(at_j.get(k)):>6}" for k in ("accuracy", "sensitivity", "specificity", "f1"))
            + f"  {_fmt(block['ece']):>6}"
        )
    return "\n".join(lines)


def localization_table(report: Mapping[str, Any]) -> str:
    """Every method's four metrics with intervals, overall and per view."""
    header = (f"{'method':<10} {'view':<4} {'n':>4} | {'point_acc':<21} | {'pointing_15px':<21} | "
              f"{'energy_in_box':<21} | {'laterality (n)':<27}")
    lines = [header, "-" * len(header)]
    for method, entry in report.items():
        for view, block in [("all", entry), *entry.get("by_view", {}).items()]:
            laterality = f"{_fmt_ci(block, 'laterality_acc')} ({block['n_laterality']})"
            lines.append(f"{method:<10} {view:<4} {block['n']:>4} | {_fmt_ci(block, 'point_acc'):<21} | "
                         f"{_fmt_ci(block, POINTING_KEY):<21} | {_fmt_ci(block, 'energy_in_box'):<21} | {laterality:<27}")
    return "\n".join(lines)


# =============================================================================== W&B


def summary_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested metrics to ``a/b/c`` scalars; a CI ``[low, high]`` becomes two keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(summary_scalars(value, f"{name}/"))
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            flat[f"{name}_low"], flat[f"{name}_high"] = value
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


def log_to_wandb(trained: TrainedRun, metrics: Mapping[str, Any], per_image: pd.DataFrame,
                 figures: Sequence[Path], prefix: str = "eval/") -> Optional[Path]:
    """Summary, per-image table and figures into the run's W&B run (never fatal)."""
    from PIL import Image

    from pylon.tracking import Tracker, latest_wandb_run_id

    cfg, root = trained.cfg, trained.paths.root
    continuing = latest_wandb_run_id(root) is not None
    tracker = Tracker(
        root,
        project=cfg.logging.project,
        run_name=root.name,
        # A resumed run keeps its training config; re-sending it could clash with eval overrides.
        config=None if continuing else to_dict(cfg),
        mode=cfg.logging.wandb_mode,
        entity=cfg.logging.entity,
        resume=True,
    )
    try:
        if tracker.active:
            tracker.summary(**summary_scalars(jsonable(metrics), prefix))
            tracker.log_table(f"{prefix}{metrics['split']}_per_image", per_image)
            items = [(np.asarray(Image.open(p).convert("RGB")), None, [], p.name) for p in figures]
            tracker.log_images(f"{prefix}figures", items)
    finally:
        tracker.finish()
    return tracker.wandb_dir


# =============================================================================== evaluate.py


@dataclass
class EvaluationResult:
    metrics: dict
    outputs: list[Path]
    text: str  # the printed tables


def evaluate_run(run: RunPaths, *, overrides: Sequence[str] = (), localization: bool = False,
                 out: Optional[Path] = None) -> EvaluationResult:
    """Everything evaluate.py does; returns metrics.json's content and the files written.

    ``eval.split=all`` scores every readable image of the configured sources (another data
    set, e.g. ``--set data.rsna_root=...``) with what the run stored at training time: input
    normalisation, val-chosen threshold and box prior; nothing is estimated from the new data.
    """
    trained = load_trained_run(run, overrides)
    cfg = trained.cfg
    split, n_boot, seed = cfg.eval.split, int(cfg.eval.bootstrap), int(cfg.train.seed)
    prior = trained.checkpoint_info.get("prior")
    methods = resolve_methods(trained.model, list(cfg.eval.methods), prior is not None) if localization else []
    data = prepare_data(cfg.data, split=split != ALL)
    stored = stored_normalization(trained.checkpoint_info)
    if stored is not None:  # the model's own input contract, whatever data it now sees
        data = replace(data, mean=stored[0], std=stored[1])
    out = run.eval_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)

    val = None if split == ALL else predict_split(trained, data, "val")
    evaluated = val if split == "val" else predict_split(trained, data, split)
    youden, youden_note = run_threshold(trained, val)
    classification = classification_report(evaluated, youden, youden_note, n_boot, seed)
    metrics: dict[str, Any] = {
        "run": str(run.root),
        "checkpoint": str(run.best),
        "checkpoint_epoch": trained.checkpoint_info.get("epoch"),
        "split": split,
        "data": {source: str(Path(cfg.data[f"{source}_root"]).resolve()) for source in cfg.data.sources},
        "classification": classification,
    }
    figures = classification_figures(evaluated, classification, run.history, out)
    youden = classification["threshold_youden"]["threshold"]
    figures.append(misclassified_gallery(trained, data, evaluated, 0.5 if youden is None else youden,
                                         out / "failures_misclassified.png"))
    text = [classification_table(classification)]

    per_image = evaluated.frame()
    outputs: list[Path] = []
    if localization:
        probs_by_row = dict(zip(evaluated.rows.tolist(), evaluated.probs.tolist()))
        outcome = localize(trained, data, split, methods, probs_by_row, prior)
        if outcome.rows.size == 0:
            note = f"no images with boxes in the {split} split: localization not scored"
            metrics["localization"] = {}
            metrics["localization_note"] = note
            text.append(note)
        else:
            views = [data.cache.records[int(r)].view for r in outcome.rows]
            metrics["localization"] = localization_report(outcome, views, n_boot, seed)
            if outcome.tolerance_px != 15.0:
                metrics["localization_note"] = f"{POINTING_KEY} uses a tolerance of {outcome.tolerance_px:g} px (eval.pointing_tolerance_px)"
            figures += localization_figures(outcome, out)
            frame = localization_frame(outcome, data.cache)
            frame.to_csv(out / "localization.csv", index=False)
            outputs.append(out / "localization.csv")
            for method in methods:
                hits = frame[frame.method == method].set_index("id")
                per_image[f"hit_{method}"] = per_image["id"].map(hits["point_acc_hit"])
                per_image[f"{POINTING_KEY}_{method}"] = per_image["id"].map(hits[f"{POINTING_KEY}_hit"])
            text.append(f"localization on {split} (images with >= 1 box; point_acc: argmax inside a box at "
                        f"the {data.cache.image_size}px input; {POINTING_KEY}: within "
                        f"{outcome.tolerance_px:g}px of a box in the original image; energy_in_box: "
                        f"share of the min-max scaled map inside the boxes; laterality: peak on the boxes' side "
                        f"of the midline, images with boxes on one side only)\n"
                        + localization_table(metrics["localization"]))

    scored = [evaluated] if split in ("val", ALL) else [val, evaluated]
    predictions = pd.concat([p.frame() for p in scored], ignore_index=True)
    predictions.to_csv(out / "predictions.csv", index=False)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(jsonable(metrics), indent=2) + "\n")
    outputs = [metrics_path, out / "predictions.csv", *outputs, *figures]

    wandb_dir = log_to_wandb(trained, metrics, per_image, figures, prefix="eval/" if split != ALL else "eval_external/")
    if wandb_dir is not None:
        outputs.append(wandb_dir)
    return EvaluationResult(jsonable(metrics), outputs, "\n\n".join(text))


# =============================================================================== predict.py


@dataclass
class ImagePrediction:
    path: str
    id: str
    probability: Optional[float] = None
    peak_x: Optional[float] = None  # argmax of the heatmap, original-image pixels
    peak_y: Optional[float] = None
    method: Optional[str] = None
    overlay: Optional[Path] = None
    error: Optional[str] = None


def read_boxes_csv(path: Path) -> dict[str, list[tuple[float, ...]]]:
    """patientId -> boxes (x, y, w, h) from an RSNA ``stage_2_train_labels.csv``-style file."""
    from pylon.data.report import IndexReport
    from pylon.data.rsna import RSNA_POLICY, _read_label_rows  # the indexer's own parser

    if not Path(path).is_file():
        raise ConfigError(f"--boxes-csv {path}: file not found")
    try:
        _, boxes = _read_label_rows(Path(path), IndexReport(source="rsna", policy=dict(RSNA_POLICY)))
    except (ValueError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"--boxes-csv {path}: {err}") from None
    return boxes


def _unique_path(folder: Path, stem: str, suffix: str, taken: set) -> Path:
    candidate, n = folder / f"{stem}{suffix}", 1
    while candidate in taken:
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    taken.add(candidate)
    return candidate


def _heatmap_on_original(heatmap: torch.Tensor, geometry: Geometry, size: int) -> np.ndarray:
    """The network-frame heatmap cut to the part that covers the original image (drops
    letterbox padding), so plots.overlay can stretch it over the original."""
    full = F.interpolate(heatmap[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    x0, y0 = int(round(geometry.pad_x)), int(round(geometry.pad_y))
    w = max(1, int(round(geometry.orig_w * geometry.scale_x)))
    h = max(1, int(round(geometry.orig_h * geometry.scale_y)))
    return full[y0:y0 + h, x0:x0 + w].numpy()


def _display_scale(image: np.ndarray) -> float:
    return min(1.0, MAX_OVERLAY_SIDE / max(image.shape))


def _save_overlay(path: Path, image: np.ndarray, heatmap: np.ndarray, boxes: Sequence[Sequence[float]],
                  point: Sequence[float]) -> Path:
    import cv2
    from PIL import Image

    scale = _display_scale(image)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    boxes = [[v * scale for v in b] for b in boxes]
    point = [v * scale for v in point]
    Image.fromarray(plots.overlay(image, heatmap, boxes, point)).save(path)
    return path


def file_preprocessing(trained: TrainedRun) -> Callable[[np.ndarray], tuple[np.ndarray, Geometry, torch.Tensor]]:
    """The run's own input pipeline for an original image: the cache's resize (``data.image_size``,
    ``data.resize``) and the training normalisation. Returns (resized uint8, geometry, tensor)."""
    mean, std = input_normalization(trained)
    size, resize = int(trained.cfg.data.image_size), str(trained.cfg.data.resize)
    transform = eval_transform(size, mean=mean, std=std)

    def preprocess(original: np.ndarray) -> tuple[np.ndarray, Geometry, torch.Tensor]:
        resized, geometry = resize_image(original, size, resize)
        return resized, geometry, transform(image=resized)["image"]

    return preprocess


def predict_files(trained: TrainedRun, paths: Sequence[Path], out: Path, *, method: Optional[str] = None,
                  boxes_by_id: Optional[Mapping[str, Sequence]] = None,
                  report_error: Callable[[str], None] = lambda m: tqdm.write(f"error: {m}", file=sys.stderr)) -> list[ImagePrediction]:
    """Probability, heatmap peak and an overlay PNG per image file, in the given order.

    Preprocessing is the cache's (``resize_image`` at the run's size and mode) plus the
    run's normalisation. Unreadable files are reported through ``report_error`` and listed
    with their ``error``; the others are still processed.
    """
    cfg = trained.cfg
    method = method or methods_for(trained.model)[0]
    if method not in methods_for(trained.model):
        raise ConfigError(f"--method {method}: not available for this {cfg.model.arch} model; use one of {methods_for(trained.model)}")
    preprocess = file_preprocessing(trained)
    size = int(cfg.data.image_size)
    out.mkdir(parents=True, exist_ok=True)
    results: list[ImagePrediction] = []
    taken: set = set()
    dtype = amp_dtype(trained.device, cfg.train)
    batch_size = max(1, int(cfg.eval.batch_size))
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", leave=False):
        loaded = []
        for path in paths[start:start + batch_size]:
            item = ImagePrediction(str(path), Path(path).stem)
            results.append(item)
            try:
                original = read_image(path)
            except ImageReadError as err:
                item.error = str(err)
                report_error(item.error)
                continue
            _, geometry, tensor = preprocess(original)
            loaded.append((item, original, geometry, tensor))
        if not loaded:
            continue
        batch = torch.stack([t for *_, t in loaded]).to(trained.device)
        with torch.no_grad(), autocast(trained.device, dtype):
            probs = torch.sigmoid(trained.model(batch).logits[:, 0].float()).cpu().numpy()
        maps = heatmaps(trained.model, batch, method, prior=trained.checkpoint_info.get("prior"))
        points = argmax_points(maps, (size, size))
        for (item, original, geometry, _), prob, heat, point in zip(loaded, probs, maps, points):
            peak = geometry.points_to_original(point)[0]
            item.probability, item.peak_x, item.peak_y, item.method = float(prob), float(peak[0]), float(peak[1]), method
            boxes = list((boxes_by_id or {}).get(item.id, []))
            item.overlay = _save_overlay(_unique_path(out, f"{item.id}_{method}", ".png", taken), original,
                                         _heatmap_on_original(heat, geometry, size), boxes, peak)
    return results


def write_predictions_csv(results: Sequence[ImagePrediction], path: Path) -> Path:
    frame = pd.DataFrame([{
        "file": r.path, "id": r.id, "probability": r.probability, "peak_x": r.peak_x, "peak_y": r.peak_y,
        "method": r.method, "overlay": "" if r.overlay is None else str(r.overlay), "error": r.error or "",
    } for r in results])
    frame.to_csv(path, index=False)
    return path


def predictions_table(results: Sequence[ImagePrediction]) -> str:
    header = f"{'file':<40} {'P(pneumonia)':>12}  {'peak (x, y) px':<18} overlay"
    lines = [header, "-" * len(header)]
    for r in results:
        name = Path(r.path).name
        name = name if len(name) <= 40 else "..." + name[-37:]
        if r.error:
            lines.append(f"{name:<40} {'failed':>12}  {'':<18} (see the error above)")
        else:
            lines.append(f"{name:<40} {r.probability:>12.4f}  {f'({r.peak_x:.0f}, {r.peak_y:.0f})':<18} {r.overlay}")
    return "\n".join(lines)

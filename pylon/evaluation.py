"""Evaluate a trained run (``evaluate.py``) into ``<run>/eval/``: metrics.json, CSVs and figures.

The data is rebuilt as in training (same split, checked against splits.csv) and normalised with the
mean and std stored in best.pt; ``eval.split=all`` scores another data set with what the run stored
(normalisation, threshold, prior). The README's evaluation protocol says what each number is.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from pylon import ConfigError, plots
from pylon.data.pipeline import ALL, PreparedData, prepare_data, rows_loader
from pylon.data.sources import report_group
from pylon.heatmaps import heatmaps, methods_for, resolve_methods
from pylon.device import bar_disabled
from pylon.inference import SplitPredictions, TrainedRun, image_heatmaps, load_run, predict_split
from pylon.models import Ensemble
from pylon.metrics import (LOCALIZATION_METRICS, POINTING_KEY, argmax_points, bootstrap_ci,
                           classification_section, energy_in_box, jsonable, laterality_hits, pointing_game)
from pylon.runs import RunPaths, check_splits, replacing_folder
from pylon.tables import classification_table, localization_table
from pylon.tracking import Tracker

N_FAILURES = 16  # images per failure gallery


def classification_report(evaluated: SplitPredictions, youden: Optional[float], n_boot: int, seed: int) -> dict:
    """metrics.json's ``classification``: ``classification_section``, the split, its loss, where Youden was chosen."""
    groups = {"source": evaluated.sources, "view": evaluated.views}
    report = {"split": evaluated.split, "loss": evaluated.loss, **classification_section(
        evaluated.labels, evaluated.probs, evaluated.patients, groups, youden, n_boot, seed)}
    entry = {"threshold": youden, "chosen_on": "val", **report.get("threshold_youden", {})}
    if youden is None:
        entry["note"] = "no Youden threshold: the val split had one class"
    elif evaluated.split == "val":
        entry["note"] = "chosen and evaluated on the same (val) split: optimistic"
    report["threshold_youden"] = entry
    return report


@dataclass
class Localization:
    """Per boxed image (in ``rows`` order) and method: peaks and the four metrics' per-image values."""

    rows: np.ndarray
    methods: list[str]
    tolerance_px: float
    values: dict[str, dict[str, list]]  # method -> metric -> per-image values
    points: dict[str, list]  # method -> (x, y) in the network-input frame
    points_original: dict[str, list]


def localize(trained: TrainedRun, data: PreparedData, split: str, methods: Sequence[str]) -> Localization:
    """Score every method on every boxed image of ``split`` in one batched pass."""
    cfg, cache = trained.cfg, data.cache
    rows = np.array([r for r in data.rows[split] if len(cache.boxes_in_cache_frame(r))], dtype=np.int64)
    outcome = Localization(rows, list(methods), float(cfg.eval.pointing_tolerance_px),
                           {m: {k: [] for k in LOCALIZATION_METRICS} for m in methods},
                           {m: [] for m in methods}, {m: [] for m in methods})
    if rows.size == 0:
        return outcome
    loader = rows_loader(data, rows, cfg.data, cfg.eval.batch_size)
    size = (cache.image_size, cache.image_size)
    for batch in tqdm(loader, desc=f"localization ({', '.join(methods)})", leave=False, disable=bar_disabled(True)):
        batch_rows = [int(r) for r in batch["row"]]
        boxes = [cache.boxes_in_cache_frame(r) for r in batch_rows]
        boxes_original = [np.asarray(cache.records[r].scored_boxes) for r in batch_rows]
        for m in methods:
            maps = heatmaps(trained.model, batch["image"], m, trained.prior, trained.precision).numpy()  # pylon: float64
            points = argmax_points(maps, size)
            original = np.concatenate([cache.to_original(r, pt[None]) for r, pt in zip(batch_rows, points)])
            values = outcome.values[m]
            values["point_acc"] += list(pointing_game(points, boxes, 0.0))
            values[POINTING_KEY] += list(pointing_game(original, boxes_original, outcome.tolerance_px))
            values["energy_in_box"] += list(energy_in_box(maps, boxes, size))
            values["laterality_acc"] += list(laterality_hits(points, boxes, size[1]))
            outcome.points[m] += points.tolist()
            outcome.points_original[m] += original.tolist()
    return outcome


def localization_block(values: Mapping[str, list], keep: np.ndarray, patients: np.ndarray, n_boot: int,
                       seed: int) -> dict:
    """The four metrics' means over the images in ``keep``, with 95% intervals over resampled
    patients; ``n_laterality`` counts the images whose boxes all lie on one side of the midline."""
    entry: dict[str, Any] = {}
    for key in LOCALIZATION_METRICS:
        array = np.asarray(values[key], dtype=np.float64)[keep]
        finite = np.isfinite(array)
        array = array[finite]
        entry[key] = float(array.mean()) if array.size else math.nan
        if n_boot >= 1 and array.size:
            entry.setdefault("ci", {})[key] = bootstrap_ci(lambda a: {"mean": a.mean(-1)}, array, n_boot=n_boot,
                                                           seed=seed, groups=patients[keep][finite])["mean"]
        if key == "laterality_acc":
            entry["n_laterality"] = int(array.size)
    entry["n"] = int(keep.sum())
    return entry


def localization_report(values: Mapping[str, Mapping[str, list]], views: Sequence[Optional[str]],
                        patients: Sequence[str], n_boot: int, seed: int) -> dict:
    """metrics.json's ``localization`` by method, from each method's per-image values (ordered as ``views``)."""
    views, patients = np.array([v or "" for v in views]), np.asarray(patients)
    everyone = np.ones(len(views), dtype=bool)
    report = {}
    for m, per_image in values.items():
        entry = localization_block(per_image, everyone, patients, n_boot, seed)
        entry["by_view"] = {v: localization_block(per_image, views == v, patients, n_boot, seed)
                            for v in sorted(set(views) - {""})}
        if "prior" in values and m != "prior":
            # Paired: the same films and people resampled together, so the interval of the difference
            # is narrower than two overlapping intervals suggest; above 0 = the map beats the floor.
            gap = {k: np.subtract(per_image[k], values["prior"][k], dtype=np.float64) for k in LOCALIZATION_METRICS}
            entry["minus_prior"] = localization_block(gap, everyone, patients, n_boot, seed)
        report[m] = entry
    return report


def localization_frame(outcome: Localization, data: PreparedData) -> pd.DataFrame:
    """One row per scored image and method (localization.csv)."""
    rows = []
    for m in outcome.methods:
        v = outcome.values[m]
        for i, row in enumerate(outcome.rows):
            (x, y), (xi, yi) = outcome.points_original[m][i], outcome.points[m][i]
            rows.append({"id": data.cache.records[int(row)].id, "method": m, "point_x": x, "point_y": y,
                         "point_x_input": xi, "point_y_input": yi, "point_acc_hit": bool(v["point_acc"][i]),
                         f"{POINTING_KEY}_hit": bool(v[POINTING_KEY][i]), "energy_in_box": v["energy_in_box"][i],
                         "laterality_hit": v["laterality_acc"][i]})
    return pd.DataFrame(rows)


def _heatmaps(trained: TrainedRun, data: PreparedData, images: Sequence[np.ndarray], method: str) -> np.ndarray:
    return image_heatmaps(trained.model, images, data.mean, data.std, method, trained.prior, trained.cfg.eval.batch_size,
                          trained.precision)


def _gallery(trained: TrainedRun, data: PreparedData, rows: Sequence[int], method: str, captions: Sequence[str],
             points: Optional[Sequence] = None) -> list[plots.GalleryImage]:
    """Gallery entries of cache ``rows`` with their ``method`` heatmap, crossed at ``points`` (default: the peaks)."""
    images = [data.cache.image(r) for r in rows]
    maps = _heatmaps(trained, data, images, method)
    points = argmax_points(maps, (data.cache.image_size,) * 2) if points is None else points
    return [plots.GalleryImage(image, m, data.cache.boxes_in_cache_frame(r).tolist(), point, caption)
            for image, m, r, point, caption in zip(images, maps, rows, points, captions)]


def _caption(data: PreparedData, row: int, prob: float) -> str:
    record = data.cache.records[row]
    return f"{record.source} {record.id.rsplit('/', 1)[-1][:14]} {record.view or ''} y={record.label} p={prob:.2f}"


def misclassified_gallery(trained: TrainedRun, data: PreparedData, evaluated: SplitPredictions,
                          threshold: float, out: Path) -> Path:
    """The most confident errors at ``threshold``, with the model's own heatmap."""
    wrong = np.flatnonzero((evaluated.probs >= threshold) != evaluated.labels.astype(bool))
    chosen = wrong[np.argsort(-np.abs(evaluated.probs[wrong] - threshold), kind="stable")][:N_FAILURES]
    rows = evaluated.rows[chosen].tolist()
    shown = _gallery(trained, data, rows, methods_for(trained.model)[0],
                     [_caption(data, r, p) for r, p in zip(rows, evaluated.probs[chosen])])
    return plots.plot_failure_gallery(
        shown, out, n_failures=len(wrong), n_images=len(evaluated.probs),
        title=f"Misclassified at threshold {threshold:.3f} ({evaluated.split}, most confident first)")


def localization_figures(trained: TrainedRun, data: PreparedData, outcome: Localization,
                         probs_by_row: Mapping[int, float], out: Path) -> list[Path]:
    """The overlay grid (the first ``eval.n_overlays`` boxed images, every method) and the
    primary method's first missed localizations; only the shown images' heatmaps are computed again."""
    cache, methods = data.cache, outcome.methods
    primary = next((m for m in methods if m != "center"), methods[0])  # the model's own method first
    hit = {m: np.asarray(outcome.values[m]["point_acc"]) == 1 for m in methods}
    caption = lambda i: _caption(data, int(outcome.rows[i]), probs_by_row.get(int(outcome.rows[i]), math.nan))  # noqa: E731
    figures = []
    shown = list(range(min(trained.cfg.eval.n_overlays, len(outcome.rows))))
    if shown:
        images = [cache.image(int(outcome.rows[i])) for i in shown]
        maps = {m: _heatmaps(trained, data, images, m) for m in methods}
        grid = [plots.OverlayRow(images[k], {m: maps[m][k] for m in methods},
                                 cache.boxes_in_cache_frame(int(outcome.rows[i])).tolist(),
                                 {m: outcome.points[m][i] for m in methods}, caption(i), {m: bool(hit[m][i]) for m in methods})
                for k, i in enumerate(shown)]
        figures.append(plots.plot_overlay_grid(grid, out / "overlays.png", title=(
            f"Heatmaps on boxed images (green: boxes, cross: argmax; {', '.join(methods)})")))
    misses = np.flatnonzero(~hit[primary])
    chosen = misses[:N_FAILURES].tolist()
    shown = _gallery(trained, data, outcome.rows[chosen].tolist(), primary, [caption(i) for i in chosen],
                     [outcome.points[primary][i] for i in chosen])
    figures.append(plots.plot_failure_gallery(
        shown, out / "failures_localization.png", n_failures=len(misses), n_images=len(outcome.rows),
        title=f"Missed localizations ({primary}, point_acc)"))
    return figures


@dataclass
class EvaluationResult:
    metrics: dict
    outputs: list[Path]
    text: str  # the printed tables


def evaluate_run(run: RunPaths, *, overrides: Sequence[str] = (), localization: bool = False,
                 embeddings: bool = False, out: Optional[Path] = None) -> EvaluationResult:
    """Everything evaluate.py does; returns metrics.json's content and the files written."""
    trained = load_run(run, overrides)
    cfg = trained.cfg
    split = cfg.eval.split
    if run.crossval.is_file() and split != ALL:
        raise ConfigError(f"{run.root} is a cross-validation: its fold models together have seen every image of its "
                          "data; score the ensemble on other data (eval.split=all, --out DIR), or evaluate one fold")
    if run.ensemble.is_file() and split != ALL:
        own_split = run.splits.read_bytes()
        manifests = [RunPaths(m).splits for m in trained.info.get("members", [])]
        if not all(m.is_file() and m.read_bytes() == own_split for m in manifests):
            raise ConfigError(f"{run.root}: its runs were not all trained on the split in its {run.splits.name}; "
                              "score the ensemble on other data (eval.split=all, --out DIR)")
    if embeddings and isinstance(trained.model, Ensemble):
        raise ConfigError(f"{run.root} is an ensemble: it has no one encoder to map; map one of its runs")
    roots = lambda data: {s: os.path.abspath(str(data.roots.get(s))) for s in data.sources}  # noqa: E731
    if out is None and (split == ALL or roots(cfg.data) != roots(trained.trained_data)):  # not the run's own images
        raise ConfigError(f"eval.split={split} with these data.sources and roots is not the run's own test data: give "
                          f"--out DIR for its results, so that {run.eval_dir} stays the run's own evaluation")
    if out is not None and Path(out).is_dir() and any(Path(out).iterdir()) and not Path(out, "metrics.json").is_file():
        raise ConfigError(f"--out {out} holds files but no evaluation (no metrics.json): they would be replaced; "
                          "give a new or empty folder")
    methods = resolve_methods(trained.model, list(cfg.eval.methods), trained.prior is not None) if localization else []
    data = prepare_data(cfg.data, split=split != ALL, normalization=trained.mean_std)  # the model's input contract
    if split != ALL and run.splits.is_file():  # exactly the images the run was selected and tested on
        check_splits(run.splits, data, sorted({"val", split}), cfg.data.sources)
    elif split != ALL:
        print(f"note: {run.root} has no split manifest (splits.csv); the split is derived again from the data")
    out = run.eval_dir if out is None else Path(out)
    with replacing_folder(out) as folder:
        metrics, outputs, figures, per_image, text = _evaluate_into(folder, trained, data, run, methods, embeddings)
    outputs, figures = ([out / path.relative_to(folder) for path in paths] for paths in (outputs, figures))

    prefix = "eval/" if split != ALL else "eval_external/"
    tracker = Tracker(run.root, cfg.logging, run_id=trained.info.get("wandb_run_id"), job_type="eval")
    tracker.summary({prefix.rstrip("/"): metrics})
    tracker.log_table(f"{prefix}{split}_per_image", per_image)
    for path in figures:  # one key per figure: W&B groups same-key images and wants one size
        tracker.log_images(f"{prefix}figures/{path.stem}", [(np.asarray(Image.open(path).convert("RGB")), path.name)])
    tracker.finish()
    if tracker.dir is not None:
        outputs.append(tracker.dir)
    return EvaluationResult(metrics, outputs, text)


def _evaluate_into(out: Path, trained: TrainedRun, data: PreparedData, run: RunPaths, methods: Sequence[str],
                   embeddings: bool) -> tuple[dict, list[Path], list[Path], pd.DataFrame, str]:
    """Predict, score and write ``out``; returns (metrics, files, figures, per-image table, printed text)."""
    cfg = trained.cfg
    split, n_boot, seed = cfg.eval.split, int(cfg.eval.bootstrap), int(cfg.train.seed)
    val = None if split == ALL else predict_split(trained, data, "val", embeddings and split == "val")
    evaluated = val if split == "val" else predict_split(trained, data, split, embeddings)
    youden = trained.info.get("threshold_youden")  # chosen on val when the run was trained
    classification = classification_report(evaluated, youden, n_boot, seed)
    if cfg.train.pos_weight is not None and "pos_weight" not in trained.info:
        classification["loss_note"] = "unweighted BCE: this run's best.pt predates storing train.pos_weight"
    metrics: dict[str, Any] = {
        "run": str(run.root), "checkpoint": trained.info.get("members", str(run.best)), "checkpoint_epoch": trained.info.get("epoch"), "split": split,
        "precision": trained.precision.name, "trained_precision": trained.info.get("precision"),
        "data": {s: str(Path(cfg.data.roots[s]).resolve()) for s in cfg.data.sources},
        "classification": classification}
    figures = plots.plot_classification(evaluated.labels, evaluated.probs, evaluated.sources, split, youden, out)
    if run.history.is_file():
        figures.append(plots.plot_learning_curves(run.history, out / "learning_curves.png"))
    figures.append(misclassified_gallery(trained, data, evaluated, 0.5 if youden is None else youden,
                                         out / "failures_misclassified.png"))
    view_names = {v: f"{evaluated.sources[evaluated.views == v][0]}/{v}" for v in classification["by_view"]}
    text = [classification_table(classification, view_names)]
    per_image = evaluated.frame(data)
    outputs: list[Path] = []
    if methods:
        added = _localization_into(out, trained, data, evaluated, methods, metrics, per_image)
        figures, outputs, text = figures + added[0], added[1], text + added[2]
    if embeddings:  # imported here: numba compiles UMAP on import
        from pylon.embeddings import embedding_maps

        metrics["embeddings"], maps, shortcut_text = embedding_maps(data, evaluated, classification, out, n_boot, seed)
        figures, outputs, text = figures + maps, outputs + [out / "embeddings.csv"], text + [shortcut_text]

    scored = [evaluated] if split in ("val", ALL) else [val, evaluated]
    pd.concat([s.frame(data) for s in scored], ignore_index=True).to_csv(out / "predictions.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2) + "\n")
    outputs = [out / "metrics.json", out / "predictions.csv", *outputs, *figures]
    return jsonable(metrics), outputs, figures, per_image, "\n\n".join(text)


def _localization_into(out: Path, trained: TrainedRun, data: PreparedData, evaluated: SplitPredictions,
                       methods: Sequence[str], metrics: dict, per_image: pd.DataFrame
                       ) -> tuple[list[Path], list[Path], list[str]]:
    """Score ``methods`` into ``metrics`` and ``per_image``; returns the figures, files and text it adds."""
    split, n_boot, seed = trained.cfg.eval.split, int(trained.cfg.eval.bootstrap), int(trained.cfg.train.seed)
    outcome = localize(trained, data, split, methods)
    if outcome.rows.size == 0:
        metrics["localization"] = {}
        metrics["localization_note"] = f"no images with boxes in the {split} split: localization not scored"
        return [], [], [metrics["localization_note"]]
    records = [data.cache.records[int(r)] for r in outcome.rows]
    metrics["localization"] = localization_report(outcome.values, [report_group(r) for r in records],
                                                  [r.patient_id for r in records], n_boot, seed)
    for entry in metrics["localization"].values():
        entry["pointing_tolerance_px"] = outcome.tolerance_px
    if outcome.tolerance_px != 15.0:
        metrics["localization_note"] = f"{POINTING_KEY} uses a tolerance of {outcome.tolerance_px:g} px"
    figures = localization_figures(trained, data, outcome, dict(zip(evaluated.rows.tolist(),
                                                                    evaluated.probs.tolist())), out)
    frame = localization_frame(outcome, data)
    frame.to_csv(out / "localization.csv", index=False)
    for m in methods:
        hits = frame[frame.method == m].set_index("id")
        per_image[f"hit_{m}"] = per_image["id"].map(hits["point_acc_hit"])
        per_image[f"{POINTING_KEY}_{m}"] = per_image["id"].map(hits[f"{POINTING_KEY}_hit"])
    text = [f"localization on {split} (images with >= 1 box; point_acc: argmax inside a box at the "
            f"{data.cache.image_size}px input; {POINTING_KEY}: within {outcome.tolerance_px:g}px of a box "
            "in the original image; energy_in_box: share of the min-max scaled map inside the boxes; "
            "laterality: peak on the boxes' side of the midline, images with boxes on one side only)\n"
            + localization_table(metrics["localization"])]
    return figures, [out / "localization.csv"], text

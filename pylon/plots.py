"""Evaluation figures: ROC / PR curves, confusion matrix, calibration, learning curves and
heatmap overlays. Every ``plot_*`` function writes one PNG and returns its path.

Figures are drawn with matplotlib's object API on an Agg canvas, so importing this module
never changes the global backend of an interactive session and works on headless machines.

Overlay conventions match ``pylon.metrics``: boxes are ``(x, y, w, h)`` in image pixels and
points are continuous ``(x, y)`` (pixel ``(r, c)`` has centre ``(c + 0.5, r + 0.5)``).
Heatmaps are upsampled bilinearly with half-pixel centres (``align_corners=False``), the
same resampling the point metric uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from pylon.metrics import binary_inputs, binary_labels, calibration_bins, expected_calibration_error

PathLike = Union[str, Path]
Curves = Mapping[str, Tuple[Any, Any]]  # name -> (labels, probs)

BOX_COLOUR = (0, 255, 0)  # RGB
POINT_COLOUR = (255, 255, 255)
POINT_EDGE = (0, 0, 0)
_DPI = 120


# ============================================================================ figure plumbing


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ============================================================================ curves


def _curve_inputs(curves: Curves) -> list:
    if not curves:
        raise ValueError("no curves to plot: pass {name: (labels, probs)}")
    out = []
    for name, pair in curves.items():
        if len(pair) != 2:
            raise ValueError(f"curve {name!r}: expected (labels, probs), got {len(pair)} items")
        y, p = binary_inputs(*pair)
        out.append((str(name), y, p))
    return out


def plot_roc(curves_by_group: Curves, path: PathLike, title: str = "ROC") -> Path:
    """ROC curve per group (``{name: (labels, probs)}``); legend gives AUROC and n."""
    fig = _figure(5.2, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, y, p in _curve_inputs(curves_by_group):
        if y.all() or not y.any():
            ax.plot([], [], label=f"{name}: one class only (n={y.size})")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name}: AUROC {auc(fpr, tpr):.3f} (n={y.size})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(curves_by_group: Curves, path: PathLike, title: str = "Precision-recall") -> Path:
    """Precision-recall curve per group; legend gives average precision, prevalence and n."""
    fig = _figure(5.2, 5.0)
    ax = fig.add_subplot()
    for name, y, p in _curve_inputs(curves_by_group):
        if not y.any():
            ax.plot([], [], label=f"{name}: no positives (n={y.size})")
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        ap = average_precision_score(y, p)
        line, = ax.step(recall, precision, where="post", linewidth=1.8,
                        label=f"{name}: AP {ap:.3f}, prevalence {y.mean():.2f} (n={y.size})")
        ax.axhline(y.mean(), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    labels: Any,
    preds: Any,
    path: PathLike,
    class_names: Sequence[str] = ("normal", "pneumonia"),
    title: str = "Confusion matrix",
) -> Path:
    """2x2 confusion matrix of 0/1 ``labels`` vs 0/1 ``preds``: counts and row shares."""
    y = binary_labels(labels, "labels")
    pred = binary_labels(preds, "preds")
    if pred.shape != y.shape:
        raise ValueError(f"labels and preds differ in length: {y.size} vs {pred.size}")
    counts = np.array([[np.sum(~y & ~pred), np.sum(~y & pred)], [np.sum(y & ~pred), np.sum(y & pred)]])
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{counts[i, j]}\n({shares[i, j]:.1%})", ha="center", va="center",
                    color="white" if shares[i, j] > 0.6 else "black", fontsize=11)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=list(class_names), yticklabels=list(class_names),
           xlabel="predicted", ylabel="true", title=f"{title} (n={y.size})")
    fig.colorbar(image, ax=ax, label="share of true class")
    return _save(fig, path)


def plot_calibration(labels: Any, probs: Any, path: PathLike, n_bins: int = 10,
                     title: str = "Calibration") -> Path:
    """Reliability diagram (fraction positive vs mean probability per bin) + histogram."""
    bins = calibration_bins(labels, probs, n_bins)
    ece = expected_calibration_error(labels, probs, n_bins)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    fig = _figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    filled = bins.count > 0
    top.bar(centres[filled], bins.frac_pos[filled], width=width * 0.9, color="tab:blue", alpha=0.75,
            edgecolor="tab:blue", label="fraction positive")
    top.plot(bins.mean_prob[filled], bins.frac_pos[filled], "o-", color="tab:red", markersize=4,
             label="(mean probability, fraction positive)")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive", title=f"{title}: ECE {ece:.3f} (n={int(bins.count.sum())})")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, bins.count, width=width * 0.9, color="0.5")
    bottom.set(xlabel="predicted probability", ylabel="count")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(history: Union[PathLike, pd.DataFrame], path: PathLike,
                         title: str = "Training history") -> Path:
    """Loss (train/val), validation AUROC and learning rate against epoch.

    ``history`` is ``history.csv`` (or its DataFrame) with an ``epoch`` column and any of
    ``train_loss, val_loss, val_auroc, lr``; a panel whose columns are missing says so.
    """
    frame = history if isinstance(history, pd.DataFrame) else _read_history(Path(history))
    if frame.empty:
        raise ValueError("training history has no rows")
    epochs = frame["epoch"] if "epoch" in frame else pd.Series(np.arange(1, len(frame) + 1))
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "validation")], False),
        ("validation AUROC", [("val_auroc", "val AUROC")], False),
        ("learning rate", [("lr", "lr")], True),
    ]
    fig = _figure(12.0, 3.6)
    axes = fig.subplots(1, 3)
    for ax, (name, columns, log_scale) in zip(axes, panels):
        drawn = False
        for column, label in columns:
            if column in frame and frame[column].notna().any():
                ax.plot(epochs, frame[column], "o-", markersize=3, linewidth=1.5, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"not recorded\n({', '.join(c for c, _ in columns)})", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
        elif log_scale and (frame["lr"] > 0).all():
            ax.set_yscale("log")
        if name == "loss" and drawn:
            ax.legend(fontsize=8)
            if "val_loss" in frame and frame["val_loss"].notna().any():
                best = int(frame["val_loss"].idxmin())
                ax.axvline(epochs.iloc[best], color="0.5", linestyle=":", linewidth=1)
        ax.set(xlabel="epoch", title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _read_history(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such history file")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV history ({err})") from err


# ============================================================================ overlays


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a uint8 or float image, (H, W), (1, H, W), (H, W, 1|3)."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # channels-first tensor
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"image must be (H, W), (1, H, W) or (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError("image contains NaN/inf")
        low, high = arr.min(), arr.max()
        # Floats already in [0, 1] keep their brightness; anything else (normalised inputs) is stretched.
        if low < 0.0 or high > 1.0:
            arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
        arr = np.rint(arr * 255.0).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def _resize_map(heatmap: Any, height: int, width: int) -> np.ndarray:
    arr = heatmap.detach().cpu().numpy() if hasattr(heatmap, "detach") else np.asarray(heatmap)
    arr = np.squeeze(arr).astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {np.shape(heatmap)}")
    if not np.isfinite(arr).all():
        raise ValueError("heatmap contains NaN/inf")
    if arr.shape != (height, width):
        # INTER_LINEAR uses half-pixel centres: the same resampling as align_corners=False.
        arr = cv2.resize(arr, (width, height), interpolation=cv2.INTER_LINEAR)
    return arr


def _line_width(height: int, width: int) -> int:
    return max(1, int(round(min(height, width) / 150)))


def draw_boxes(rgb: np.ndarray, boxes: Optional[Sequence[Sequence[float]]], colour=BOX_COLOUR) -> np.ndarray:
    """Outline each ``(x, y, w, h)`` box on a copy of ``rgb``."""
    out = rgb.copy()
    thickness = _line_width(*out.shape[:2])
    for box in boxes or ():
        x, y, w, h = (float(v) for v in box[:4])
        # The box covers the pixels whose centres lie in [x, x + w] (as in pylon.metrics).
        left, top = math.ceil(x - 0.5), math.ceil(y - 0.5)
        right, bottom = max(left, math.floor(x + w - 0.5)), max(top, math.floor(y + h - 0.5))
        top_left, bottom_right = (int(left), int(top)), (int(right), int(bottom))
        cv2.rectangle(out, top_left, bottom_right, colour, thickness, lineType=cv2.LINE_8)
    return out


def draw_point(rgb: np.ndarray, point: Optional[Sequence[float]]) -> np.ndarray:
    """Mark a continuous ``(x, y)`` point with an outlined cross on a copy of ``rgb``."""
    out = rgb.copy()
    if point is None:
        return out
    px, py = (float(v) for v in point)
    if not (math.isfinite(px) and math.isfinite(py)):
        return out
    centre = (int(math.floor(px)), int(math.floor(py)))
    size = max(7, int(round(min(out.shape[:2]) / 20)))
    thickness = _line_width(*out.shape[:2])
    cv2.drawMarker(out, centre, POINT_EDGE, cv2.MARKER_CROSS, size + 2, thickness + 2)
    cv2.drawMarker(out, centre, POINT_COLOUR, cv2.MARKER_CROSS, size, thickness)
    return out


def overlay(
    image: Any,
    heatmap: Any,
    boxes: Optional[Sequence[Sequence[float]]] = None,
    point: Optional[Sequence[float]] = None,
    alpha: float = 0.6,
    cmap: str = "jet",
    value_range: Optional[Tuple[float, float]] = (0.0, 1.0),
) -> np.ndarray:
    """The image with the colour-mapped heatmap blended on top; boxes and point drawn.

    The heatmap is upsampled to the image and scaled by ``value_range`` (our methods all
    give [0, 1]; ``None`` = min-max of this map). Each pixel's opacity is ``alpha`` times
    its heat, so cold regions show the plain radiograph and hot ones the colour map.
    Returns (H, W, 3) uint8 RGB.
    """
    rgb = _as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    heat = _resize_map(heatmap, height, width)
    low, high = (float(heat.min()), float(heat.max())) if value_range is None else value_range
    heat = np.clip((heat - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(heat)
    colour = colormaps[cmap](heat)[..., :3]
    opacity = (alpha * heat)[..., None]
    blended = (1.0 - opacity) * (rgb / 255.0) + opacity * colour
    out = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    return draw_point(draw_boxes(out, boxes), point)


@dataclass
class OverlayRow:
    """One image of an overlay grid: ``heatmaps`` and ``points`` are keyed by method."""

    image: Any
    heatmaps: Mapping[str, Any]
    boxes: Sequence[Sequence[float]] = ()
    points: Mapping[str, Optional[Sequence[float]]] = field(default_factory=dict)
    title: str = ""
    hits: Mapping[str, bool] = field(default_factory=dict)


def _as_row(row: Any) -> OverlayRow:
    if isinstance(row, OverlayRow):
        return row
    if not isinstance(row, (tuple, list)) or not 2 <= len(row) <= 5:
        raise ValueError("each row must be an OverlayRow or (image, {method: heatmap}, boxes, points[, title])")
    image, maps, *rest = row
    boxes = rest[0] if len(rest) > 0 and rest[0] is not None else ()
    points = rest[1] if len(rest) > 1 and rest[1] is not None else {}
    title = rest[2] if len(rest) > 2 else ""
    return OverlayRow(image, maps, boxes, points, title)


def plot_overlay_grid(rows: Sequence[Any], path: PathLike, title: str = "", cell_inches: float = 2.6) -> Path:
    """Grid with one row per image: the image with its boxes, then one overlay per method.

    ``rows``: ``OverlayRow`` or ``(image, {method: heatmap}, boxes, {method: (x, y)}[, title])``.
    Methods missing from a row leave an empty cell. A method whose hit is given in
    ``OverlayRow.hits`` is captioned hit/miss.
    """
    rows = [_as_row(r) for r in rows]
    if not rows:
        raise ValueError("no rows to plot")
    methods = list(dict.fromkeys(m for r in rows for m in r.heatmaps))
    n_cols = 1 + len(methods)
    fig = _figure(cell_inches * n_cols, cell_inches * len(rows) + (0.4 if title else 0.0))
    axes = np.atleast_2d(fig.subplots(len(rows), n_cols, squeeze=False))
    for i, row in enumerate(rows):
        base = _as_rgb_uint8(row.image)
        _show(axes[i, 0], draw_boxes(base, row.boxes), row.title or "image", column_title="image" if i == 0 else None)
        for j, method in enumerate(methods, start=1):
            ax = axes[i, j]
            if method not in row.heatmaps:
                ax.axis("off")
                continue
            shown = overlay(base, row.heatmaps[method], row.boxes, row.points.get(method))
            caption = ""
            if method in row.hits:
                caption = "hit" if row.hits[method] else "miss"
            _show(ax, shown, caption, column_title=method if i == 0 else None)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _show(ax: Any, rgb: np.ndarray, caption: str, column_title: Optional[str] = None) -> None:
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if column_title:
        ax.set_title(column_title, fontsize=10, fontweight="bold")
    if caption:
        ax.set_xlabel(caption, fontsize=8)


def plot_failure_gallery(
    images: Sequence[Any],
    heatmaps: Sequence[Any],
    boxes: Sequence[Sequence[Sequence[float]]],
    points: Sequence[Optional[Sequence[float]]],
    hits: Sequence[bool],
    path: PathLike,
    captions: Optional[Sequence[str]] = None,
    max_items: int = 16,
    n_cols: int = 4,
    title: str = "Localization failures",
) -> Path:
    """Overlays of the images whose point missed every box (``hits`` False), first
    ``max_items`` of them, each with its boxes and predicted point. Writes a figure saying
    so when there are no failures."""
    n = len(images)
    if not (len(heatmaps) == len(boxes) == len(points) == len(hits) == n):
        raise ValueError(
            f"images, heatmaps, boxes, points and hits must have equal lengths, got "
            f"{[n, len(heatmaps), len(boxes), len(points), len(hits)]}"
        )
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions has {len(captions)} entries for {n} images")
    misses = [i for i in range(n) if not bool(hits[i])]
    shown = misses[:max_items]
    if not shown:
        fig = _figure(4.0, 1.5)
        fig.text(0.5, 0.5, f"{title}: none ({n} images, all hits)", ha="center", va="center")
        return _save(fig, path)
    n_cols = max(1, min(n_cols, len(shown)))
    n_rows = math.ceil(len(shown) / n_cols)
    fig = _figure(2.8 * n_cols, 2.9 * n_rows + 0.4)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for k, ax in enumerate(axes.flat):
        if k >= len(shown):
            ax.axis("off")
            continue
        i = shown[k]
        caption = captions[i] if captions is not None else f"#{i}"
        _show(ax, overlay(images[i], heatmaps[i], boxes[i], points[i]), caption)
    fig.suptitle(f"{title}: {len(shown)} of {len(misses)} misses ({n} images)")
    return _save(fig, path)

"""Evaluation figures: each ``plot_*`` writes one PNG and returns its path. Made without pyplot, so
importing this never changes an interactive session's matplotlib backend; overlays draw boxes, points and
heatmaps in ``pylon.metrics``' pixel conventions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import auc, average_precision_score, confusion_matrix, precision_recall_curve, roc_curve

from pylon.metrics import binary_inputs, by_group, calibration_bins, expected_calibration_error

PathLike = Union[str, Path]
Curves = Mapping[str, tuple[Any, Any]]  # name -> (labels, probs)

BOX_COLOUR = (0, 255, 0)  # RGB


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_roc(curves: Curves, path: PathLike, title: str = "ROC") -> Path:
    """ROC curve per group (``{name: (labels, probs)}``); the legend gives AUROC and n."""
    ax = _figure(5.2, 5.0).add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (labels, probs) in curves.items():
        y, p = binary_inputs(labels, probs)
        if y.all() or not y.any():
            ax.plot([], [], label=f"{name}: one class only (n={y.size})")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name}: AUROC {auc(fpr, tpr):.3f} (n={y.size})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(ax.figure, path)


def plot_pr(curves: Curves, path: PathLike, title: str = "Precision-recall") -> Path:
    """Precision-recall curve per group; the legend gives average precision, prevalence and n."""
    ax = _figure(5.2, 5.0).add_subplot()
    for name, (labels, probs) in curves.items():
        y, p = binary_inputs(labels, probs)
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
    return _save(ax.figure, path)


def plot_confusion(labels: Any, preds: Any, path: PathLike, title: str = "Confusion matrix") -> Path:
    """2x2 confusion matrix of 0/1 ``labels`` vs 0/1 ``preds``: counts and shares of each true class."""
    y, pred = binary_inputs(labels, preds)
    counts = confusion_matrix(y, pred.astype(bool), labels=[False, True])
    shares = confusion_matrix(y, pred.astype(bool), labels=[False, True], normalize="true")  # 0 for an absent class
    names = ["normal", "pneumonia"]
    ax = _figure(4.6, 4.0).add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(2, 2):
        ax.text(j, i, f"{counts[i, j]}\n({shares[i, j]:.1%})", ha="center", va="center",
                color="white" if shares[i, j] > 0.6 else "black", fontsize=11)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=f"{title} (n={y.size})")
    ax.figure.colorbar(image, ax=ax, label="share of true class")
    return _save(ax.figure, path)


def plot_calibration(labels: Any, probs: Any, path: PathLike, title: str = "Calibration") -> Path:
    """Reliability diagram (fraction positive vs mean probability per bin) over a histogram."""
    bins = calibration_bins(labels, probs)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    filled = bins.count > 0
    fig = _figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    top.bar(centres[filled], bins.frac_pos[filled], width=width * 0.9, color="tab:blue", alpha=0.75,
            edgecolor="tab:blue", label="fraction positive")
    top.plot(bins.mean_prob[filled], bins.frac_pos[filled], "o-", color="tab:red", markersize=4,
             label="(mean probability, fraction positive)")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive",
            title=f"{title}: ECE {expected_calibration_error(labels, probs):.3f} (n={int(bins.count.sum())})")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, bins.count, width=width * 0.9, color="0.5")
    bottom.set(xlabel="predicted probability", ylabel="count")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_classification(labels: Any, probs: Any, sources: Sequence[str], split: str, youden: Optional[float],
                        out: Path) -> list[Path]:
    """ROC and PR curves (overall and per source), confusion at 0.5 and at Youden's threshold, calibration."""
    y, p = np.asarray(labels), np.asarray(probs)
    curves = {"all": (y, p)}
    if len(set(sources)) > 1:
        curves.update(by_group(lambda yy, pp: (yy, pp), sources, y, p))
    paths = [plot_roc(curves, out / "roc.png", title=f"ROC ({split})"),
             plot_pr(curves, out / "pr.png", title=f"Precision-recall ({split})"),
             plot_confusion(y, (p >= 0.5).astype(int), out / "confusion.png", title=f"Confusion at 0.5 ({split})")]
    if youden is not None:
        paths.append(plot_confusion(y, (p >= youden).astype(int), out / "confusion_youden.png",
                                    title=f"Confusion at Youden {youden:.3f} ({split})"))
    paths.append(plot_calibration(y, p, out / "calibration.png", title=f"Calibration ({split})"))
    return paths


def plot_learning_curves(history_csv: PathLike, path: PathLike) -> Path:
    """Loss (train/val), validation AUROC and learning rate against epoch, from ``history.csv``;
    a panel without values (e.g. AUROC on a one-class val split) says so."""
    try:
        frame = pd.read_csv(history_csv)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise ValueError(f"{history_csv}: not a readable CSV history ({err})") from err
    if frame.empty:
        raise ValueError(f"{history_csv}: the training history has no rows")
    epochs = frame["epoch"]
    panels = {"loss": {"train_loss": "train", "val_loss": "validation"}, "validation AUROC": {"val_auroc": "val AUROC"},
              "learning rate": {"lr": "lr"}}  # title: {column: legend label}
    fig = _figure(12.0, 3.6)
    for ax, (name, columns) in zip(fig.subplots(1, 3), panels.items()):
        drawn = [c for c in columns if c in frame and frame[c].notna().any()]
        for column in drawn:
            ax.plot(epochs, frame[column], "o-", markersize=3, linewidth=1.5, label=columns[column])
        if not drawn:
            ax.text(0.5, 0.5, f"not recorded\n({', '.join(columns)})", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        elif name == "learning rate" and (frame["lr"] > 0).all():
            ax.set_yscale("log")
        elif name == "loss":
            ax.legend(fontsize=8)
            chosen = "val_select_loss" if "val_select_loss" in frame else "val_loss"  # the loss best.pt was kept on
            if "val_loss" in drawn and frame[chosen].notna().any():
                ax.axvline(epochs.iloc[int(frame[chosen].idxmin())], color="0.5", linestyle=":", linewidth=1)
        ax.set(xlabel="epoch", title=name)
        ax.grid(alpha=0.3)
    fig.suptitle("Training history")
    return _save(fig, path)


def plot_embedding(points: np.ndarray, colourings: Mapping[str, Sequence[str]], path: PathLike, title: str = "") -> Path:
    """One scatter of the same 2-D points per colouring (``{panel title: category per point}``)."""
    fig = _figure(4.6 * len(colourings), 4.8)
    for ax, (name, categories) in zip(np.atleast_1d(fig.subplots(1, len(colourings))), colourings.items()):
        categories = np.asarray(list(categories), dtype=str)
        for k, category in enumerate(sorted(set(categories.tolist()))):
            chosen = categories == category
            ax.scatter(points[chosen, 0], points[chosen, 1], s=9, alpha=0.7, color=colormaps["tab10"](k % 10),
                       linewidths=0, label=f"{category} ({int(chosen.sum())})")
        ax.set(title=f"by {name}", xticks=[], yticks=[])
        ax.legend(fontsize=8, markerscale=1.5, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def _line_width(height: int, width: int) -> int:
    return max(1, int(round(min(height, width) / 150)))


def _draw_boxes(rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    out = rgb.copy()
    for box in boxes:
        x, y, w, h = (float(v) for v in box)
        # Outline the pixels whose centres lie in [x, x + w] x [y, y + h] (as in pylon.metrics).
        left, top = math.ceil(x - 0.5), math.ceil(y - 0.5)
        right, bottom = max(left, math.floor(x + w - 0.5)), max(top, math.floor(y + h - 0.5))
        cv2.rectangle(out, (left, top), (right, bottom), BOX_COLOUR, _line_width(*out.shape[:2]), lineType=cv2.LINE_8)
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image)


def overlay(image: np.ndarray, heatmap: Any, boxes: Sequence[Sequence[float]] = (),
            point: Optional[Sequence[float]] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the uint8 (H, W[, 3]) image with the heatmap (in [0, 1], any size) blended on in
    the jet colour map at an opacity of 0.6 times its heat (cold regions show the plain radiograph), boxes
    outlined and the point (unless missing or nan) crossed."""
    rgb = _rgb(image)
    height, width = rgb.shape[:2]
    heat = np.squeeze(np.asarray(heatmap)).astype(np.float32)
    # INTER_LINEAR uses half-pixel centres: the same resampling as align_corners=False (a same-size map is copied).
    heat = np.clip(cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3]
    opacity = (0.6 * heat)[..., None]
    blended = (1.0 - opacity) * (rgb / 255.0) + opacity * colour
    out = _draw_boxes(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8), boxes)
    if point is not None and all(math.isfinite(float(v)) for v in point):
        centre = (math.floor(float(point[0])), math.floor(float(point[1])))
        size, thickness = max(7, int(round(min(height, width) / 20))), _line_width(height, width)
        cv2.drawMarker(out, centre, (0, 0, 0), cv2.MARKER_CROSS, size + 2, thickness + 2)  # a black outline
        cv2.drawMarker(out, centre, (255, 255, 255), cv2.MARKER_CROSS, size, thickness)
    return out


@dataclass
class OverlayRow:
    """One image of an overlay grid; ``heatmaps``, ``points`` and ``hits`` are keyed by method."""

    image: Any
    heatmaps: dict = field(default_factory=dict)
    boxes: Sequence[Sequence[float]] = ()
    points: dict = field(default_factory=dict)
    title: str = ""
    hits: dict = field(default_factory=dict)


def _show(ax: Axes, rgb: np.ndarray, caption: str, column_title: Optional[str] = None) -> None:
    ax.imshow(rgb, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    if column_title:
        ax.set_title(column_title, fontsize=10, fontweight="bold")
    if caption:
        ax.set_xlabel(caption, fontsize=8)


def plot_overlay_grid(rows: Sequence[OverlayRow], path: PathLike, title: str = "") -> Path:
    """One row per image: the image with its boxes, then one overlay per method (an empty
    cell where a row lacks the method), captioned hit/miss where ``hits`` has the method."""
    methods = list(dict.fromkeys(m for r in rows for m in r.heatmaps))
    n_cols, cell = 1 + len(methods), 2.6
    fig = _figure(cell * n_cols, cell * len(rows) + (0.4 if title else 0.0))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for i, row in enumerate(rows):
        base = _rgb(row.image)
        _show(axes[i, 0], _draw_boxes(base, row.boxes), row.title or "image", "image" if i == 0 else None)
        for j, method in enumerate(methods, start=1):
            if method not in row.heatmaps:
                axes[i, j].axis("off")
                continue
            caption = ("hit" if row.hits[method] else "miss") if method in row.hits else ""
            shown = overlay(base, row.heatmaps[method], row.boxes, row.points.get(method))
            _show(axes[i, j], shown, caption, method if i == 0 else None)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


@dataclass
class GalleryImage:
    """One image of a failure gallery: its heatmap, boxes and point (None: no point drawn)."""

    image: Any
    heatmap: Any
    boxes: Sequence[Sequence[float]]
    point: Optional[Sequence[float]]
    caption: str = ""


def plot_failure_gallery(shown: Sequence[GalleryImage], path: PathLike, *, n_failures: int, n_images: int,
                         title: str = "") -> Path:
    """Overlays of the failures shown, four to a row, titled with how many of the ``n_failures``
    among ``n_images`` images they are; one line when none."""
    prefix = f"{title}: " if title else ""
    if not shown:
        fig = _figure(4.0, 1.5)
        fig.text(0.5, 0.5, f"{prefix}none of {n_images} images", ha="center", va="center")
        return _save(fig, path)
    n_cols = min(4, len(shown))
    n_rows = math.ceil(len(shown) / n_cols)
    fig = _figure(2.8 * n_cols, 2.9 * n_rows + 0.4)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, one in zip(axes, shown):
        _show(ax, overlay(one.image, one.heatmap, one.boxes, one.point), one.caption)
    for ax in axes[len(shown):]:
        ax.axis("off")
    fig.suptitle(f"{prefix}{len(shown)} of {n_failures} shown, out of {n_images} images")
    return _save(fig, path)

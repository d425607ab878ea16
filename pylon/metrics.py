"""Classification and localization metrics, shared by training, evaluation and plots.

Classification (binary: label 1 = pneumonia, ``probs`` = P(label 1)):

* ``classification_metrics``: AUROC, accuracy, sensitivity, specificity, precision, F1 at a
  threshold (a probability ``>= threshold`` is called positive). Values that are undefined on
  the given data (AUROC with one class present, sensitivity without positives, ...) are
  ``nan`` and explained under ``"note"``; nothing raises for them.
* ``by_group``: the same per source / per view.
* ``youden_threshold``, ``calibration_bins`` / ``expected_calibration_error``.
* ``bootstrap_ci``: percentile bootstrap intervals for any metric (vectorised metrics such
  as ``mean_rows`` and ``auroc_rows`` evaluate all resamples in a few array operations).

Localization (the README's evaluation protocol):

* Coordinates are continuous image coordinates: the image covers ``[0, W] x [0, H]`` and
  pixel (row ``r``, column ``c``) is the unit square ``[c, c + 1] x [r, r + 1]``. The point a
  pixel stands for is its **centre**, ``(x, y) = (c + 0.5, r + 0.5)``.
* A box ``(x, y, w, h)`` is the closed rectangle ``[x, x + w] x [y, y + h]`` (edges count).
  For integer boxes a pixel centre is inside exactly when the pixel is in the rasterised
  mask ``mask[y:y + h, x:x + w]``, and the convention survives rescaling: multiplying
  points and boxes by the same factor maps one frame onto another (e.g. a 256 px network
  input onto the 1024 px RSNA original), which a pixel-index convention would not.
* ``argmax_points``: bilinear upsampling (``align_corners=False``) of each map to the image
  size, then the first maximum in row-major order, returned as its pixel centre.
* ``pointing_game``: a point hits when its Euclidean distance to the nearest box is at
  most ``tolerance`` (0 inside a box). Images without boxes are not counted.
* ``point_accuracy`` = ``argmax_points`` + ``pointing_game`` (default tolerance 0).
* ``energy_in_box`` (the energy-based pointing game of Score-CAM, Wang et al. 2020): the share
  of a map's mass inside the boxes, after bilinear upsampling to the image size and min-max
  scaling to [0, 1], so that a constant offset carries no energy; a constant map counts as
  uniform (its energy is the boxes' area share).
* ``laterality_hits``: on images whose boxes all lie on one side of the vertical midline
  (by box centre), whether the point is on that side. A constant point cannot score well on
  both sides at once, which is where an image-blind prior fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]
Boxes = Sequence[Optional[Sequence[Sequence[float]]]]

# Upsampled maps are processed in chunks of about this many pixels (float32: 64 MiB).
_CHUNK_PIXELS = 1 << 24
# Bootstrap resample indices are drawn in blocks of about this many entries.
_BOOT_BLOCK = 1 << 22


# ============================================================================ helpers


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _flat_1d(values: Any) -> np.ndarray:
    arr = _to_numpy(values)
    return arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr


def binary_labels(labels: ArrayLike, name: str = "labels") -> np.ndarray:
    """1-D bool array from 0/1 (or bool) values; a clear error for anything else."""
    y = _flat_1d(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{name} must be 0 or 1, got dtype {y.dtype}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"{name} must be 0 or 1, found {np.unique(y[bad])[:5].tolist()}")
    return y.astype(bool)


def binary_inputs(labels: ArrayLike, probs: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Validated 1-D ``(labels as bool, probs as float64)``."""
    y = binary_labels(labels)
    p = _flat_1d(probs)
    if p.ndim != 1:
        raise ValueError(f"probs must be 1-D, got shape {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("no samples: labels and probs are empty")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs contain {int(np.sum(~np.isfinite(p)))} NaN/inf value(s)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"probs must lie in [0, 1] (got min {p.min():.4g}, max {p.max():.4g}); "
            f"apply a sigmoid to logits first"
        )
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays made plain Python and NaN/inf made ``None``.

    ``json.dump`` would otherwise write ``NaN``, which is not JSON.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ============================================================================ classification


def classification_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float = 0.5) -> dict:
    """Binary classification metrics; ``probs >= threshold`` is a positive call.

    Returns ``auroc, accuracy, sensitivity, specificity, precision, f1`` (float, ``nan``
    when undefined on this data), the confusion counts ``tp, fp, tn, fn``, ``n, n_pos``,
    ``threshold`` and, only when something is undefined, ``note`` (a sentence saying why).
    """
    y, p = binary_inputs(labels, probs)
    pred = p >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    n, n_pos = int(y.size), int(y.sum())
    notes = []
    if 0 < n_pos < n:
        auroc = float(roc_auc_score(y, p))
    else:
        auroc = math.nan
        notes.append(f"auroc undefined: only one class present (n_pos={n_pos} of n={n})")
    if n_pos == 0:
        notes.append("sensitivity undefined: no positive labels")
    if n_pos == n:
        notes.append("specificity undefined: no negative labels")
    if tp + fp == 0:
        notes.append("precision undefined: nothing was predicted positive")
    result = {
        "auroc": auroc,
        "accuracy": (tp + tn) / n,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "n": n,
        "n_pos": n_pos,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }
    if notes:
        result["note"] = "; ".join(notes)
    return result


def by_group(
    labels: ArrayLike,
    probs: ArrayLike,
    groups: Sequence[Hashable],
    threshold: float = 0.5,
    min_n: int = 1,
) -> dict:
    """``{group: classification_metrics(...)}`` for each distinct group value.

    Samples whose group is missing (``None``, NaN, ``pd.NA``; e.g. no view recorded) are left out; groups with
    fewer than ``min_n`` samples are skipped. Keys are the group values as strings, sorted.
    """
    y, p = binary_inputs(labels, probs)
    g = np.asarray(groups, dtype=object)
    if g.shape != y.shape:
        raise ValueError(f"groups has {g.shape[0] if g.ndim else 'no'} entries, labels {y.shape[0]}")
    known = ~np.asarray(pd.isna(g), dtype=bool)
    keys = np.array([str(v) for v in g], dtype=object)
    out = {}
    for key in sorted(set(keys[known])):
        mask = known & (keys == key)
        if mask.sum() >= min_n:
            out[key] = classification_metrics(y[mask], p[mask], threshold)
    return out


def youden_threshold(labels: ArrayLike, probs: ArrayLike) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    Ties go to the highest such threshold (the most specific operating point).
    """
    y, p = binary_inputs(labels, probs)
    if y.all() or not y.any():
        raise ValueError("youden_threshold needs both classes present in labels")
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (nothing positive)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thresholds[int(np.argmax(j))])


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width probability bins ``(edges[i], edges[i + 1]]`` (0 falls in the first)."""

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) samples per bin
    mean_prob: np.ndarray  # (n_bins,) mean predicted probability, nan for empty bins
    frac_pos: np.ndarray  # (n_bins,) observed fraction of positives, nan for empty bins


def calibration_bins(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> CalibrationBins:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    y, p = binary_inputs(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(index, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(index, weights=y.astype(np.float64), minlength=n_bins) / count
    return CalibrationBins(edges, count, mean_prob, frac_pos)


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin share of samples) * |fraction positive - mean probability|."""
    bins = calibration_bins(labels, probs, n_bins)
    filled = bins.count > 0
    weights = bins.count[filled] / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.frac_pos[filled] - bins.mean_prob[filled])))


# ============================================================================ bootstrap


def mean_rows(values: np.ndarray) -> np.ndarray:
    """Vectorised metric for ``bootstrap_ci``: the mean of each resample (e.g. hit rate)."""
    return np.asarray(values, dtype=np.float64).mean(axis=-1)


def auroc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Vectorised metric for ``bootstrap_ci``: AUROC of each row (Mann-Whitney U, ties
    counted one half, as in ``roc_auc_score``); ``nan`` for rows with one class only."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    ranks = rankdata(s, axis=-1)  # average ranks for ties
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    u = np.where(y, ranks, 0.0).sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def bootstrap_ci(
    metric_fn: Callable[..., Any],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    vectorized: bool = False,
) -> Tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval of ``metric_fn(*arrays)``.

    All ``arrays`` are resampled with the same indices (paired). With ``vectorized=False``
    ``metric_fn`` is called once per resample with 1-D arrays; with ``vectorized=True`` it
    receives 2-D arrays (resamples x samples) and must return one value per row
    (``mean_rows``, ``auroc_rows``), which is much faster. Both modes draw the same
    resamples for the same ``seed``. Resamples whose metric is nan (e.g. AUROC of a resample
    with one class) are dropped; ``(nan, nan)`` if none is left.

    Examples: ``bootstrap_ci(auroc_rows, labels, probs, vectorized=True)``,
    ``bootstrap_ci(mean_rows, result.hits, vectorized=True)``.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    data = [_to_numpy(a) for a in arrays]
    n = data[0].shape[0] if data[0].ndim else 0
    if n == 0 or any(a.ndim == 0 or a.shape[0] != n for a in data):
        raise ValueError(f"bootstrap_ci needs non-empty arrays of equal length, got {[a.shape for a in data]}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BOOT_BLOCK // n)
    stats = []
    for start in range(0, n_boot, rows_per_block):
        index = rng.integers(0, n, size=(min(rows_per_block, n_boot - start), n))
        if vectorized:
            block = np.asarray(metric_fn(*[a[index] for a in data]), dtype=np.float64).reshape(-1)
            if block.shape[0] != index.shape[0]:
                raise ValueError(
                    f"vectorized metric_fn returned {block.shape[0]} values for {index.shape[0]} resamples"
                )
            stats.append(block)
        else:
            stats.append(np.array([float(metric_fn(*[a[row] for a in data])) for row in index]))
    values = np.concatenate(stats)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


# ============================================================================ localization


@dataclass(frozen=True)
class PointResult:
    """Outcome of ``point_accuracy`` / ``pointing_game`` over the images that have boxes."""

    accuracy: float  # hits / n, nan when n == 0
    n: int  # images counted (those with >= 1 box)
    hits: np.ndarray  # (n,) bool, per counted image
    points: np.ndarray  # (n, 2) float (x, y) of each counted image's point
    indices: np.ndarray  # (n,) int, position of each counted image in the input
    tolerance: float

    def as_dict(self) -> dict:
        """``{"accuracy": float | None, "n": int}`` ready for JSON."""
        return {"accuracy": None if self.n == 0 else float(self.accuracy), "n": int(self.n)}


def _flatten_boxes(boxes: Boxes, n_images: int) -> Tuple[np.ndarray, np.ndarray]:
    """All boxes as one (M, 4) float array of ``(x0, y0, x1, y1)`` + the image each is from."""
    if isinstance(boxes, (np.ndarray, torch.Tensor)) and np.ndim(boxes) == 2:
        raise ValueError(
            "boxes must hold one list of (x, y, w, h) boxes per image; got a 2-D array "
            "(wrap each image's box in a list)"
        )
    if len(boxes) != n_images:
        raise ValueError(f"got boxes for {len(boxes)} images but {n_images} heatmaps/points")
    coords, owners = [], []
    for i, entry in enumerate(boxes):
        if entry is None:
            continue
        arr = _to_numpy(entry).astype(np.float64) if len(entry) else np.zeros((0, 4))
        if arr.ndim != 2 or arr.shape[1] != 4:
            hint = " (a single box must still be wrapped in a list)" if arr.shape == (4,) else ""
            raise ValueError(f"boxes of image {i}: expected a list of (x, y, w, h), got shape {arr.shape}{hint}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"boxes of image {i} contain NaN/inf: {arr.tolist()}")
        if np.any(arr[:, 2:] < 0):
            raise ValueError(f"boxes of image {i} have a negative width or height: {arr.tolist()}")
        coords.append(np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1))
        owners.append(np.full(arr.shape[0], i, dtype=np.int64))
    if not coords:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    return np.concatenate(coords), np.concatenate(owners)


def pointing_game(points_xy: ArrayLike, boxes: Boxes, tolerance: float = 15.0) -> PointResult:
    """Hit when a point lies within ``tolerance`` (Euclidean) of any of its image's boxes.

    ``points_xy``: (N, 2) ``(x, y)`` in the frame of the boxes; ``boxes``: N lists of
    ``(x, y, w, h)``. Images without boxes are not counted. Zhang et al. 2016 (TorchRay)
    use ``tolerance=15`` in the original image frame; ``tolerance=0`` is plain containment
    with edges inclusive.
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    pts = _to_numpy(points_xy).astype(np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points_xy must have shape (N, 2), got {pts.shape}")
    coords, owner = _flatten_boxes(boxes, pts.shape[0])
    has_box = np.bincount(owner, minlength=pts.shape[0]) > 0
    px, py = pts[owner, 0], pts[owner, 1]
    # Distance from a point to a closed rectangle: per axis, how far outside it lies.
    dx = np.maximum(np.maximum(coords[:, 0] - px, px - coords[:, 2]), 0.0)
    dy = np.maximum(np.maximum(coords[:, 1] - py, py - coords[:, 3]), 0.0)
    box_hit = np.hypot(dx, dy) <= tolerance
    hit = np.bincount(owner, weights=box_hit, minlength=pts.shape[0]) > 0
    indices = np.flatnonzero(has_box)
    hits = hit[indices]
    if np.any(~np.isfinite(pts[indices])):
        raise ValueError("points_xy contain NaN/inf for images that have boxes")
    n = int(indices.size)
    return PointResult(
        accuracy=float(hits.mean()) if n else math.nan,
        n=n,
        hits=hits,
        points=pts[indices],
        indices=indices,
        tolerance=float(tolerance),
    )


def _heatmap_tensor(heatmaps: Any) -> torch.Tensor:
    maps = heatmaps.detach() if isinstance(heatmaps, torch.Tensor) else torch.as_tensor(np.asarray(heatmaps))
    if maps.ndim != 3:
        hint = " (take one class, e.g. heatmap[:, 0])" if maps.ndim == 4 else ""
        raise ValueError(f"heatmaps must have shape (N, h, w), got {tuple(maps.shape)}{hint}")
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    return maps


def _check_image_size(image_size: Sequence[int]) -> Tuple[int, int]:
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (H, W), got {image_size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def argmax_points(heatmaps: Any, image_size: Sequence[int]) -> np.ndarray:
    """(N, 2) ``(x, y)`` pixel centres of each map's first maximum on the image grid.

    ``heatmaps`` (N, h, w), numpy or torch, any resolution: upsampled bilinearly
    (``align_corners=False``) to ``image_size = (H, W)`` when it differs, then arg-maxed
    in row-major order (``torch.argmax`` returns the first maximum). Runs in chunks so the
    upsampled maps never all sit in memory.
    """
    height, width = _check_image_size(image_size)
    maps = _heatmap_tensor(heatmaps)
    n = maps.shape[0]
    flat_index = torch.empty(n, dtype=torch.long)
    chunk = max(1, _CHUNK_PIXELS // (height * width))
    for start in range(0, n, chunk):
        part = maps[start:start + chunk]
        # A row sum is NaN/inf exactly when the row holds a NaN/inf (barring float overflow),
        # and costs a tenth of torch.isfinite on big chunks.
        finite = torch.isfinite(part.flatten(1).sum(dim=1))
        if not bool(finite.all()):
            bad = start + int(torch.nonzero(~finite)[0])
            raise ValueError(f"heatmap {bad} contains NaN/inf")
        if tuple(part.shape[-2:]) != (height, width):
            part = F.interpolate(part[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        flat_index[start:start + part.shape[0]] = part.flatten(1).argmax(dim=1).cpu()
    rows = (flat_index // width).numpy()
    cols = (flat_index % width).numpy()
    return np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)


def box_mask(boxes: Sequence[Sequence[float]], image_size: Sequence[int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre lies in any of the ``(x, y, w, h)`` boxes (edges count).

    For integer boxes this is exactly the rasterised ``mask[y:y + h, x:x + w]``.
    """
    height, width = _check_image_size(image_size)
    centres_x = np.arange(width) + 0.5
    centres_y = np.arange(height) + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cols = (centres_x >= x) & (centres_x <= x + w)
        rows = (centres_y >= y) & (centres_y <= y + h)
        mask |= rows[:, None] & cols[None, :]
    return mask


def point_accuracy(
    heatmaps: Any,
    boxes: Boxes,
    image_size: Sequence[int],
    tolerance: float = 0.0,
) -> PointResult:
    """Share of images whose heatmap maximum falls in (or within ``tolerance`` of) a box.

    ``heatmaps`` (N, h, w) are used as given (sigmoid PYLON maps, CAM maps, ...); ``boxes``
    are N lists of ``(x, y, w, h)`` in ``image_size = (H, W)`` pixels. Only images with at
    least one box are counted (and upsampled). See the module docstring for the conventions.
    """
    maps = _heatmap_tensor(heatmaps)
    n = maps.shape[0]
    _, owner = _flatten_boxes(boxes, n)
    counted = np.flatnonzero(np.bincount(owner, minlength=n) > 0)
    points = np.full((n, 2), np.nan)
    if counted.size == n:
        points = argmax_points(maps, image_size)
    elif counted.size:
        points[counted] = argmax_points(maps[torch.as_tensor(counted, device=maps.device)], image_size)
    else:
        _check_image_size(image_size)
    return pointing_game(points, boxes, tolerance=tolerance)


def energy_in_box(heatmaps: Any, boxes: Boxes, image_size: Sequence[int]) -> np.ndarray:
    """(N,) share of each min-max scaled, upsampled map's mass inside its boxes; nan without boxes."""
    height, width = _check_image_size(image_size)
    maps = _heatmap_tensor(heatmaps).double()
    _flatten_boxes(boxes, maps.shape[0])  # validates the boxes
    shares = np.full(maps.shape[0], np.nan)
    for i, image_boxes in enumerate(boxes):
        if image_boxes is None or len(image_boxes) == 0:
            continue
        heat = maps[i]
        if tuple(heat.shape) != (height, width):
            heat = F.interpolate(heat[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        low, high = heat.min(), heat.max()
        if not torch.isfinite(high - low):
            raise ValueError(f"heatmap {i} contains NaN/inf")
        scaled = (heat - low) / (high - low) if high > low else torch.ones_like(heat)
        inside = torch.from_numpy(box_mask(image_boxes, (height, width)))
        shares[i] = float(scaled[inside].sum() / scaled.sum())
    return shares


def laterality_hits(points_xy: ArrayLike, boxes: Boxes, width: float) -> np.ndarray:
    """(N,) 1.0 / 0.0: the point is on the side of the midline ``width / 2`` where all the
    image's box centres lie; nan when the image has no boxes or boxes on both sides."""
    pts = _to_numpy(points_xy).astype(np.float64)
    coords, owner = _flatten_boxes(boxes, pts.shape[0])
    midline = float(width) / 2.0
    centre_x = (coords[:, 0] + coords[:, 2]) / 2.0
    n = pts.shape[0]
    n_boxes = np.bincount(owner, minlength=n)
    n_left = np.bincount(owner, weights=centre_x < midline, minlength=n)
    n_right = np.bincount(owner, weights=centre_x > midline, minlength=n)
    hits = np.full(n, np.nan)
    left, right = (n_boxes > 0) & (n_left == n_boxes), (n_boxes > 0) & (n_right == n_boxes)
    hits[left] = pts[left, 0] < midline
    hits[right] = pts[right, 0] > midline
    return hits

"""Classification and localization metrics, shared by training, evaluation and plots.

Classification is binary (label 1 = pneumonia, ``probs`` = P(label 1), ``>= threshold`` calls positive);
values undefined on the data (AUROC with one class, ...) are ``nan``, explained under ``"note"``.

Localization (the README's evaluation protocol): pixel (row ``r``, column ``c``) stands for its centre
``(c + 0.5, r + 0.5)`` and a box ``(x, y, w, h)`` is the closed rectangle ``[x, x + w] x [y, y + h]``, so an
integer box holds ``mask[y:y + h, x:x + w]`` and one scale factor maps points and boxes between frames (a
256 px input onto the 1024 px RSNA original). Heatmaps are upsampled bilinearly (``align_corners=False``);
a map's point is its first maximum in row-major order, ``(nan, nan)`` for a constant map (no evidence,
e.g. an all-zero Grad-CAM), which hits no box and no side. Images without boxes score ``nan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

Boxes = Sequence[Optional[Sequence[Sequence[float]]]]  # per image: a list of (x, y, w, h), or None
POINTING_KEY = "pointing_game_15px"  # metrics.json's name, whatever eval.pointing_tolerance_px is
LOCALIZATION_METRICS = ("point_acc", POINTING_KEY, "energy_in_box", "laterality_acc")

_BOOT_BLOCK = 1 << 22  # bootstrap indices are drawn in blocks of about this many entries
_CHUNK_PIXELS = 1 << 24  # upsampled maps are arg-maxed in chunks of about this many pixels


def _numpy(values: Any) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def binary_inputs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """1-D ``(labels as bool, probs as float64)``, one 0/1 label per probability."""
    y, p = _numpy(labels).reshape(-1), _numpy(probs).reshape(-1).astype(np.float64)
    assert y.shape == p.shape and np.isin(y, (0, 1)).all(), f"labels {np.unique(y)[:5]} for {p.size} probs"
    return y.astype(bool), p


def jsonable(obj: Any) -> Any:
    """``obj`` in plain Python, NaN/inf as ``None`` (``json`` would write NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return jsonable(_numpy(obj).tolist())
    if isinstance(obj, np.generic):  # a numpy bool, integer or float: its Python value
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _ratios(tp: Any, fp: Any, tn: Any, fn: Any) -> dict:
    """Threshold metrics from confusion counts (ints, or one per bootstrap resample); nan for a 0 denominator."""
    fractions = {"accuracy": (tp + tn, tp + fp + tn + fn), "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                 "precision": (tp, tp + fp), "f1": (2 * tp, 2 * tp + fp + fn)}
    return {k: np.where(den > 0, num / np.maximum(den, 1), np.nan) for k, (num, den) in fractions.items()}


def classification_metrics(labels: Any, probs: Any, threshold: float = 0.5) -> dict:
    """AUROC, accuracy, sensitivity, specificity, precision, F1 (``nan`` when undefined),
    ``n, n_pos, tp, fp, tn, fn, threshold`` and, when something is undefined, ``note``."""
    y, p = binary_inputs(labels, probs)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, p >= threshold, labels=[False, True]).ravel())
    n, n_pos = int(y.size), int(y.sum())
    notes = [note for note, undefined in (
        (f"auroc undefined: only one class present (n_pos={n_pos} of n={n})", not 0 < n_pos < n),
        ("sensitivity undefined: no positive labels", n_pos == 0),
        ("specificity undefined: no negative labels", n_pos == n),
        ("precision undefined: nothing was predicted positive", tp + fp == 0)) if undefined]
    auroc = float(roc_auc_score(y, p)) if 0 < n_pos < n else math.nan
    result = {"auroc": auroc, **{k: float(v) for k, v in _ratios(tp, fp, tn, fn).items()}}
    result.update(n=n, n_pos=n_pos, tp=tp, fp=fp, tn=tn, fn=fn, threshold=float(threshold))
    return {**result, "note": "; ".join(notes)} if notes else result


def _auroc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row by ranks (Mann-Whitney U, ties count one half): the value of
    ``roc_auc_score`` up to rounding, for all resamples in one sort instead of ~1 ms each."""
    ranks = rankdata(scores, axis=-1)
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    u = np.where(y, ranks, 0.0).sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def classification_rows(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5,
                        auroc: bool = True) -> dict[str, np.ndarray]:
    """``classification_metrics``' rates for each row of (resamples, n) arrays: the statistic
    for ``bootstrap_ci``, e.g. ``bootstrap_ci(partial(classification_rows, threshold=t), y, p)``."""
    y, pred = labels.astype(bool), probs >= threshold
    counts = [(y & pred).sum(-1), (~y & pred).sum(-1), (~y & ~pred).sum(-1), (y & ~pred).sum(-1)]
    return {**({"auroc": _auroc_rows(y, probs)} if auroc else {}), **_ratios(*counts)}


def bootstrap_ci(statistic: Callable[..., Mapping[str, Any]], *arrays: Any, n_boot: int = 1000,
                 seed: int = 0, groups: Optional[Any] = None) -> dict[str, list[float]]:
    """Percentile bootstrap 95% intervals ``{name: [low, high]}`` of each value ``statistic`` returns.

    The equal-length ``arrays`` are resampled together and passed as (resamples, n) arrays, one resample
    per row (one call per block of rows keeps 1,000 resamples fast); ``statistic`` returns ``{name: one
    value per row}``, e.g. ``lambda hits: {"point_acc": hits.mean(-1)}``. nan values are dropped per name
    (``[nan, nan]`` if none is left). With ``groups`` (e.g. each image's patient) whole groups are resampled.
    """
    data = [_numpy(a) for a in arrays]
    n = len(data[0])
    rng = np.random.default_rng(seed)
    per_block = max(1, _BOOT_BLOCK // n)  # blocks bound memory; the draws equal one (n_boot, n) call
    blocks = []
    for start in range(0, n_boot, per_block):
        size = (min(per_block, n_boot - start), n)
        index = rng.integers(0, n, size=size) if groups is None else _group_resamples(rng, groups, size)
        stats = statistic(*(a[index] for a in data))
        assert all(np.shape(v) == (len(index),) for v in stats.values()), "statistic must return one value per row"
        blocks.append(stats)
    intervals = {}
    for name in blocks[0]:
        values = np.concatenate([b[name] for b in blocks]).astype(np.float64)
        values = values[np.isfinite(values)]
        intervals[name] = np.quantile(values, [0.025, 0.975]).tolist() if values.size else [math.nan] * 2
    return intervals


def _group_resamples(rng: np.random.Generator, groups: Any, size: tuple[int, int]) -> np.ndarray:
    """(resamples, n) item indices of a cluster bootstrap: groups drawn with replacement, with all their items, until
    n items (the last group cut short): a person's films move together, so intervals allow for their correlation."""
    _, inverse, sizes = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    order, starts = np.argsort(inverse, kind="stable"), np.cumsum(sizes) - sizes  # items by group; where each starts
    rows, n = size
    drawn = rng.integers(0, len(sizes), size=size)  # n groups always hold at least n items
    per_group, per_row = sizes[drawn].ravel(), sizes[drawn].sum(1)
    offset = np.arange(per_group.sum())
    item = np.repeat(starts[drawn].ravel(), per_group) + offset - np.repeat(np.cumsum(per_group) - per_group, per_group)
    position = offset - np.repeat(np.cumsum(per_row) - per_row, per_row)
    return order[item[position < n]].reshape(rows, n)


def by_group(fn: Callable[..., Any], groups: Sequence[Hashable], *arrays: Any) -> dict:
    """``{group: fn(*arrays of its samples)}`` per distinct group, sorted; ``None`` and ``""`` (no view) left out."""
    g = np.asarray(list(groups), dtype=object)
    data = [_numpy(a) for a in arrays]
    keys = sorted({v for v in g.tolist() if v is not None and v != ""})
    return {key: fn(*(a[g == key] for a in data)) for key in keys}


def youden_threshold(labels: Any, probs: Any) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1; ties go to the highest (most specific)."""
    y, p = binary_inputs(labels, probs)
    assert y.any() and not y.all(), "youden_threshold needs both classes present in labels"
    fpr, tpr, thresholds = roc_curve(y, p)
    j = np.where(np.isfinite(thresholds), tpr - fpr, -np.inf)  # sklearn's first threshold is +inf
    return float(thresholds[int(np.argmax(j))])


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width probability bins ``(edges[i], edges[i + 1]]`` (0 falls in the first)."""

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) samples per bin
    mean_prob: np.ndarray  # (n_bins,) mean predicted probability, nan for empty bins
    frac_pos: np.ndarray  # (n_bins,) observed fraction of positives, nan for empty bins


def calibration_bins(labels: Any, probs: Any, n_bins: int = 10) -> CalibrationBins:
    y, p = binary_inputs(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(index, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(index, weights=y.astype(np.float64), minlength=n_bins) / count
    return CalibrationBins(edges, count, mean_prob, frac_pos)


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin share of samples) * |fraction positive - mean probability|."""
    bins = calibration_bins(labels, probs, n_bins)
    filled = bins.count > 0
    return float(np.sum(bins.count[filled] / bins.count.sum() * np.abs(bins.frac_pos[filled] - bins.mean_prob[filled])))


def group_block(labels: np.ndarray, probs: np.ndarray, patients: Optional[np.ndarray], youden: Optional[float],
                n_boot: int, seed: int) -> dict:
    """One group's metrics at 0.5 and at the val-chosen Youden threshold (without AUROC, which no threshold changes),
    with ECE; bootstrap 95% intervals, the same resamples for all, resampling ``patients`` whole when given."""

    def at(threshold: float, auroc: bool) -> dict:
        result = classification_metrics(labels, probs, threshold)
        if not auroc:
            result.pop("auroc")
        if n_boot >= 1:
            statistic = partial(classification_rows, threshold=threshold, auroc=auroc)
            result["ci"] = bootstrap_ci(statistic, labels, probs, n_boot=n_boot, seed=seed, groups=patients)
        return result

    block = {**at(0.5, True), "ece": expected_calibration_error(labels, probs)}
    if youden is not None:
        block["threshold_youden"] = at(youden, False)
    return block


def classification_section(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, groups: Mapping[str, Any],
                           youden: Optional[float], n_boot: int, seed: int) -> dict:
    """metrics.json's classification numbers: ``group_block`` of all images, the bootstrap's settings, then
    ``by_<name>``: a block per value of each of ``groups`` (``{"source": each image's source}``: ``by_source``)."""
    block = partial(group_block, youden=youden, n_boot=n_boot, seed=seed)
    return {**block(labels, probs, patients), "bootstrap_resamples": n_boot, "bootstrap_unit": "patient",
            **{f"by_{name}": by_group(block, values, labels, probs, patients) for name, values in groups.items()}}


def _points_and_boxes(points_xy: Any, boxes: Boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (N, 2) points; all boxes as one (M, 4) array of ``(x0, y0, x1, y1)`` and the image each belongs to."""
    pts = _numpy(points_xy).astype(np.float64).reshape(-1, 2)
    assert len(boxes) == len(pts), f"boxes for {len(boxes)} images, points for {len(pts)}"
    per_image = [np.asarray([] if b is None else b, dtype=np.float64).reshape(-1, 4) for b in boxes]
    xywh = np.concatenate(per_image) if per_image else np.zeros((0, 4))
    owner = np.repeat(np.arange(len(pts)), [len(b) for b in per_image])
    return pts, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), owner


def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h, w) maps resized to (N, height, width) bilinearly, half-pixel centres (align_corners=False)."""
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def argmax_points(heatmaps: Any, image_size: Sequence[int]) -> np.ndarray:
    """(N, 2) ``(x, y)`` pixel centre of each (N, h, w) map's first maximum once upsampled to ``image_size``
    (H, W), ``(nan, nan)`` for a constant map; in chunks, so the upsampled maps never all sit in memory."""
    height, width = (int(v) for v in image_size)
    maps = torch.as_tensor(_numpy(heatmaps))
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))  # float64 stays float64
    chunk = max(1, _CHUNK_PIXELS // (height * width))
    flat = torch.cat([upsample(part, height, width).flatten(1).argmax(dim=1).cpu() for part in maps.split(chunk)])
    rows, cols = np.divmod(flat.numpy(), width)
    points = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)
    # Its "first maximum" would be the top-left pixel: a left-side hit for a method that found nothing.
    points[(maps.flatten(1).amax(1) == maps.flatten(1).amin(1)).cpu().numpy()] = np.nan
    return points


def box_mask(boxes: Sequence[Sequence[float]], image_size: Sequence[int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre lies in any ``(x, y, w, h)`` box (edges count)."""
    height, width = (int(v) for v in image_size)
    centres_x, centres_y = np.arange(width) + 0.5, np.arange(height) + 0.5
    x, y, w, h = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T[:, :, None]  # each (boxes, 1)
    cols, rows = (centres_x >= x) & (centres_x <= x + w), (centres_y >= y) & (centres_y <= y + h)
    return rows.T.astype(np.int64) @ cols.astype(np.int64) > 0  # how many boxes hold each pixel, > 0


def pointing_game(points_xy: Any, boxes: Boxes, tolerance: float = 0.0) -> np.ndarray:
    """(N,) 1.0 when the point lies within ``tolerance`` (Euclidean; 0: inside, edges count) of one of its
    image's boxes, else 0.0, nan without boxes. Zhang et al. 2016 (TorchRay) use 15 px in the original frame."""
    pts, corners, owner = _points_and_boxes(points_xy, boxes)
    # Distance from a point to a closed rectangle: per axis, how far outside it lies.
    gap = np.maximum(np.maximum(corners[:, :2] - pts[owner], pts[owner] - corners[:, 2:]), 0.0)
    n_hits = np.bincount(owner, weights=np.hypot(gap[:, 0], gap[:, 1]) <= tolerance, minlength=len(pts))
    return np.where(np.bincount(owner, minlength=len(pts)) == 0, np.nan, n_hits > 0)


def point_accuracy(heatmaps: Any, boxes: Boxes, image_size: Sequence[int]) -> float:
    """Share of the boxed images whose heatmap peak lies in a box (``argmax_points`` + ``pointing_game``)."""
    hits = pointing_game(argmax_points(heatmaps, image_size), boxes)
    return float(np.mean(hits[np.isfinite(hits)])) if np.isfinite(hits).any() else math.nan


def energy_in_box(heatmaps: Any, boxes: Boxes, image_size: Sequence[int]) -> np.ndarray:
    """(N,) share of each map's mass inside its boxes, nan without boxes (Score-CAM's energy-based pointing
    game, Wang et al. 2020), after upsampling and min-max scaling: a constant offset carries no energy and a
    constant map counts as uniform."""
    height, width = (int(v) for v in image_size)
    maps = torch.as_tensor(_numpy(heatmaps)).double()
    shares = np.full(len(maps), np.nan)
    for i in [i for i, b in enumerate(boxes) if b is not None and len(b)]:
        heat = upsample(maps[i:i + 1], height, width)[0]
        low, high = heat.min(), heat.max()
        scaled = (heat - low) / (high - low) if high > low else torch.ones_like(heat)
        inside = torch.from_numpy(box_mask(boxes[i], (height, width)))
        shares[i] = float(scaled[inside].sum() / scaled.sum())
    return shares


def laterality_hits(points_xy: Any, boxes: Boxes, width: float) -> np.ndarray:
    """(N,) 1.0 / 0.0: the point is on the side of the midline ``width / 2`` where all the image's box centres
    lie; nan without boxes or with boxes on both sides (an image-blind point cannot score on both sides)."""
    pts, corners, owner = _points_and_boxes(points_xy, boxes)
    midline, n = float(width) / 2.0, len(pts)
    centre_x = (corners[:, 0] + corners[:, 2]) / 2.0
    n_boxes, hits = np.bincount(owner, minlength=n), np.full(n, np.nan)
    for side in (np.less, np.greater):
        one_sided = (n_boxes > 0) & (np.bincount(owner, weights=side(centre_x, midline), minlength=n) == n_boxes)
        hits[one_sided] = side(pts[one_sided, 0], midline)
    return hits

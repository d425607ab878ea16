"""Decode every radiograph once into a memory-mapped cache of square uint8 arrays.

Decoding a 1024x1024 JPEG-compressed DICOM costs milliseconds, a full-size Kaggle JPEG
tens of milliseconds; reading a 256x256 row of a memory-mapped ``.npy`` costs microseconds. So images are read, resized to the
network size and stored once; training epochs then only augment.

Layout of one cache, ``<cache_dir>/<key>/``:

- ``images.npy``  (N, S, S) uint8, opened with ``np.load(mmap_mode="r")``;
- ``index.csv``   row, record id, source path and the row's geometry (original H, W,
  per-axis scale, pad offsets), so boxes and points map both ways;
- ``report.json`` / ``report.csv``  the files that could not be read, with the reason;
- ``meta.json``   what the key was made of; written last, so its presence marks a
  complete cache.

The key hashes everything that changes pixels: image size, resize mode, interpolation, a
pixel-pipeline version, the reader's version, and every source file's path, size and
modification time (plus the record ids, whose order fixes the rows). Same inputs: the
cache is reused without opening a single image. A changed file or setting: a new key,
so a new cache. A cache is built in a hidden ``.building-*`` folder and renamed into place
at the end, so an interrupted build never leaves anything that looks complete.

Resize geometry, and why the default is ``"stretch"``:

- ``"stretch"`` scales each axis to S independently; ``"letterbox"`` keeps the aspect
  ratio and pads the short side with black (0), centred.
- RSNA images (the only ones with boxes, so the only ones localization is scored on) are
  1024x1024: both modes give the same pixels there.
- Kaggle pediatric images are non-square (about 1.3-1.5:1). Letterboxing them spends about
  a quarter to a third of the network input on padding, and the black bars would appear on
  one source only, whose prevalence (about 73% pneumonia) differs sharply from RSNA's, so
  they hand the classifier a label-correlated shortcut. Stretching uses every input pixel
  for anatomy and matches the reference implementation (which resizes straight to S x S).
- ``"letterbox"`` stays available for anyone who prefers undistorted anatomy; every mapping
  below handles both, because each row stores its own scale and offsets.

Interpolation: ``cv2.INTER_AREA`` when both axes shrink, ``cv2.INTER_CUBIC`` when an axis
grows (the reference uses cubic for every resize). 1024 -> 256 is a 4x reduction: cubic interpolation reads a
4x4 neighbourhood per output pixel, so it skips most input pixels and aliases fine texture
(noise, rib edges) into the result; area averaging uses every input pixel.
Random crops during training then resample the cached image with cubic interpolation,
as the reference recipe does. One difference: the reference crops the full-resolution
original, while a crop of the cache is enlarged by up to 1/sqrt(0.7) = 1.2x, so crops are
slightly softer; caching at about 1.2 x S would remove that at 1.44x the disk space.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1), so a
box (x, y, w, h) maps as x' = x * scale_x + pad_x, w' = w * scale_x (and likewise in y).
"""
from __future__ import annotations

import concurrent.futures as futures
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import cv2
import numpy as np
from tqdm import tqdm

from pylon.data import readers
from pylon.data.records import Record

log = logging.getLogger(__name__)

ResizeMode = Literal["letterbox", "stretch"]
RESIZE_MODES = ("letterbox", "stretch")
DEFAULT_RESIZE: ResizeMode = "stretch"
INTERPOLATION = "area-when-shrinking/cubic-when-growing"
# Bump when anything in this module changes the cached pixels or the files' layout.
PIXEL_PIPELINE_VERSION = 1
PAD_VALUE = 0

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
BUILDING_PREFIX = ".building-"

PathLike = Union[str, Path]


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """How one original image maps onto its S x S cache row."""

    orig_h: int
    orig_w: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def points_to_cache(self, points_xy: np.ndarray) -> np.ndarray:
        p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([p[:, 0] * self.scale_x + self.pad_x, p[:, 1] * self.scale_y + self.pad_y], axis=1)

    def points_to_original(self, points_xy: np.ndarray) -> np.ndarray:
        p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([(p[:, 0] - self.pad_x) / self.scale_x, (p[:, 1] - self.pad_y) / self.scale_y], axis=1)

    def boxes_to_cache(self, boxes_xywh: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
        return np.stack(
            [
                b[:, 0] * self.scale_x + self.pad_x,
                b[:, 1] * self.scale_y + self.pad_y,
                b[:, 2] * self.scale_x,
                b[:, 3] * self.scale_y,
            ],
            axis=1,
        )

    def boxes_to_original(self, boxes_xywh: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
        return np.stack(
            [
                (b[:, 0] - self.pad_x) / self.scale_x,
                (b[:, 1] - self.pad_y) / self.scale_y,
                b[:, 2] / self.scale_x,
                b[:, 3] / self.scale_y,
            ],
            axis=1,
        )


def resize_image(image: np.ndarray, image_size: int, mode: ResizeMode = DEFAULT_RESIZE) -> tuple[np.ndarray, Geometry]:
    """Resize a 2-D uint8 image to image_size x image_size exactly as the cache does.

    Use this for images that never pass through a cache (e.g. single-image prediction), so
    they meet the model in the same geometry as the training data.
    """
    _check_resize_args(image_size, mode)
    if image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D uint8 image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape
    size = int(image_size)
    if mode == "stretch":
        new_w, new_h = size, size
    else:
        scale = size / max(h, w)
        new_w = min(size, max(1, round(w * scale)))
        new_h = min(size, max(1, round(h * scale)))
    shrinking = new_w <= w and new_h <= h
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    resized = image if (new_w, new_h) == (w, h) else cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    if (new_w, new_h) != (size, size):
        out = np.full((size, size), PAD_VALUE, dtype=np.uint8)
        out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    else:
        out = np.ascontiguousarray(resized)
    return out, Geometry(h, w, new_w / w, new_h / h, float(pad_x), float(pad_y))


def _check_resize_args(image_size: int, mode: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")


# ---------------------------------------------------------------- the cache object


@dataclass(frozen=True)
class UnreadableImage:
    id: str
    path: str
    reason: str


class ImageCache:
    """A built cache: rows of S x S uint8 images plus the records and geometry behind them.

    ``records[i]`` describes ``image(i)``; boxes stay in original pixels on the record and
    ``boxes_in_cache_frame(i)`` maps them. Safe to send to DataLoader workers: the memory
    map is reopened lazily in each process rather than pickled.
    """

    def __init__(self, path: Path, records: list[Record], geometry: list[Geometry], meta: dict,
                 unreadable: list[UnreadableImage]):
        self.path = Path(path)
        self.records = records
        self.geometry = geometry
        self.meta = meta
        self.unreadable = unreadable
        self.image_size = int(meta["image_size"])
        self.resize = str(meta["resize"])
        self.labels = np.array([r.label for r in records], dtype=np.float32)
        self.sources = [r.source for r in records]
        self._row_of_id = {r.id: i for i, r in enumerate(records)}
        self._boxes = [
            g.boxes_to_cache(r.boxes).astype(np.float32) if r.boxes else np.zeros((0, 4), np.float32)
            for r, g in zip(records, geometry)
        ]
        self._images: Optional[np.ndarray] = None

    # Pickling the memory map would copy the whole array into every worker.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    @property
    def images(self) -> np.ndarray:
        """The (N, S, S) uint8 array, memory-mapped read-only."""
        if self._images is None:
            self._images = np.load(self.path / IMAGES_FILE, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"ImageCache({str(self.path)!r}, n={len(self)}, image_size={self.image_size}, "
                f"resize={self.resize!r}, unreadable={len(self.unreadable)})")

    def image(self, i: int) -> np.ndarray:
        """Row i as a writable (S, S) uint8 array (a copy; the cache itself is read-only)."""
        return np.array(self.images[i])

    def row_of(self, record_id: str) -> int:
        try:
            return self._row_of_id[record_id]
        except KeyError:
            raise KeyError(f"record id {record_id!r} is not in the cache {self.path}") from None

    def rows_for_split(self, split: Optional[str]) -> np.ndarray:
        """Row indices whose record has the given split ('train', 'val', 'test' or None)."""
        return np.array([i for i, r in enumerate(self.records) if r.split == split], dtype=np.int64)

    def boxes_in_cache_frame(self, i: int) -> np.ndarray:
        """Row i's boxes as a (k, 4) float32 array of (x, y, w, h) in cache pixels."""
        return self._boxes[i].copy()

    def to_original(self, i: int, points_xy: np.ndarray) -> np.ndarray:
        """Map (k, 2) points (x, y) from row i's cache frame to its original image's pixels."""
        return self.geometry[i].points_to_original(points_xy)

    def to_cache(self, i: int, points_xy: np.ndarray) -> np.ndarray:
        """Map (k, 2) points (x, y) from row i's original image to its cache frame."""
        return self.geometry[i].points_to_cache(points_xy)


# ---------------------------------------------------------------- building


def build_cache(
    records: Iterable[Record],
    cache_dir: PathLike,
    *,
    image_size: int,
    resize: ResizeMode = DEFAULT_RESIZE,
    workers: int = 2,
    progress: bool = True,
) -> ImageCache:
    """Return the cache of `records` at `image_size`, building it only if it does not exist.

    Unreadable files (``ImageReadError``) are skipped and listed in the cache's report; the
    returned cache holds the readable records only, in the order given.
    """
    records = list(records)
    _check_resize_args(image_size, resize)
    if not records:
        raise ValueError("build_cache got no records; nothing to cache")
    _check_unique_ids(records)
    cache_dir = Path(cache_dir)
    key, fingerprint = cache_key(records, image_size=image_size, resize=resize)
    final = cache_dir / key

    cache = _open_if_complete(final, records, key)
    if cache is not None:
        log.info("reusing image cache %s (%d images)", final, len(cache))
        _warn_unreadable(cache)
        return cache

    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():  # not produced by a finished build (no valid meta): stale, replace it
        shutil.rmtree(final, ignore_errors=True)
    building = cache_dir / f"{BUILDING_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    building.mkdir()
    started = time.perf_counter()
    try:
        _build_into(building, records, fingerprint, image_size, resize, workers, progress)
        try:
            os.rename(building, final)
        except OSError:
            if not (final / META_FILE).exists():
                raise
            # Another process finished the same cache first; use theirs.
    finally:
        shutil.rmtree(building, ignore_errors=True)

    cache = _open_if_complete(final, records, key)
    if cache is None:
        raise RuntimeError(f"image cache {final} is incomplete right after building it")
    log.info("built image cache %s (%d images) in %.1f s", final, len(cache), time.perf_counter() - started)
    _warn_unreadable(cache)
    return cache


def cache_key(records: Sequence[Record], *, image_size: int, resize: str) -> tuple[str, dict]:
    """Hash of everything that changes the cached pixels (and of the row order)."""
    files = []
    for record in records:
        path = os.path.abspath(record.path)
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1  # missing now: read_image will report why
        files.append([record.id, path, size, mtime])
    fingerprint = {
        "pixel_pipeline_version": PIXEL_PIPELINE_VERSION,
        "reader_version": str(getattr(readers, "READER_VERSION", 0)),
        "image_size": int(image_size),
        "resize": resize,
        "interpolation": INTERPOLATION,
        "pad_value": PAD_VALUE,
    }
    digest = hashlib.sha256(json.dumps([fingerprint, files], separators=(",", ":")).encode())
    return f"s{int(image_size)}-{resize}-{digest.hexdigest()[:16]}", fingerprint


def _check_unique_ids(records: Sequence[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"duplicate record id {record.id!r} (path {record.path}); ids must be unique to cache")
        seen.add(record.id)


def _build_into(folder: Path, records: list[Record], fingerprint: dict, image_size: int, resize: str,
                workers: int, progress: bool) -> None:
    n = len(records)
    images_path = folder / IMAGES_FILE
    np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size)).flush()

    tasks = [(i, r.path) for i, r in enumerate(records)]
    chunk = max(1, min(64, math.ceil(n / max(1, workers * 8))))
    chunks = [tasks[s : s + chunk] for s in range(0, n, chunk)]
    geometry: dict[int, Geometry] = {}
    failures: dict[int, str] = {}
    bar = tqdm(total=n, desc=f"caching images at {image_size}px", unit="img", disable=not progress)
    try:
        if workers <= 1:
            results = (_cache_chunk(images_path, image_size, resize, c) for c in chunks)
            for result in results:
                _collect(result, geometry, failures, bar)
        else:
            # forkserver, not fork: a process that already ran multithreaded OpenCV or torch
            # code (e.g. the demo generator just before) can deadlock children it forks.
            context = multiprocessing.get_context("forkserver")
            with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                pending = [pool.submit(_cache_chunk, images_path, image_size, resize, c) for c in chunks]
                for done in futures.as_completed(pending):
                    _collect(done.result(), geometry, failures, bar)
    finally:
        bar.close()

    ok_rows = [i for i in range(n) if i in geometry]
    if failures:
        _compact(folder, ok_rows, image_size)

    with open(folder / INDEX_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "id", "path", "orig_h", "orig_w", "scale_x", "scale_y", "pad_x", "pad_y"])
        for row, i in enumerate(ok_rows):
            g = geometry[i]
            writer.writerow([row, records[i].id, records[i].path, g.orig_h, g.orig_w,
                             repr(g.scale_x), repr(g.scale_y), repr(g.pad_x), repr(g.pad_y)])
    unreadable = [UnreadableImage(records[i].id, records[i].path, failures[i]) for i in sorted(failures)]
    _write_report(folder, unreadable)
    meta = dict(fingerprint, n_images=len(ok_rows), n_unreadable=len(unreadable),
                created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    # meta.json last: its presence is what marks the folder complete.
    with open(folder / META_FILE, "w") as handle:
        json.dump(meta, handle, indent=2)


def _collect(result: list, geometry: dict, failures: dict, bar: tqdm) -> None:
    for i, outcome in result:
        if isinstance(outcome, Geometry):
            geometry[i] = outcome
        else:
            failures[i] = outcome
    bar.update(len(result))


def _cache_chunk(images_path: Path, image_size: int, resize: str, tasks: list[tuple[int, str]]) -> list:
    """Worker: read, resize and write a few rows; return (row, Geometry or failure reason)."""
    cv2.setNumThreads(1)  # parallelism comes from the processes; threads would oversubscribe
    images = np.load(images_path, mmap_mode="r+")
    out = []
    for i, path in tasks:
        try:
            image = readers.read_image(path)
        except (readers.ImageReadError, OSError) as error:
            out.append((i, getattr(error, "reason", None) or str(error)))
            continue
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
            out.append((i, f"reader returned {getattr(image, 'shape', type(image))}, expected a 2-D uint8 image"))
            continue
        resized, geom = resize_image(image, image_size, resize)  # type: ignore[arg-type]
        images[i] = resized
        out.append((i, geom))
    images.flush()
    del images
    return out


def _compact(folder: Path, ok_rows: list[int], image_size: int) -> None:
    """Drop the rows of unreadable files so images.npy holds readable rows only."""
    source = np.load(folder / IMAGES_FILE, mmap_mode="r")
    compact_path = folder / "images.compact.npy"
    target = np.lib.format.open_memmap(compact_path, mode="w+", dtype=np.uint8,
                                       shape=(len(ok_rows), image_size, image_size))
    rows = np.asarray(ok_rows, dtype=np.int64)
    for start in range(0, len(rows), 1024):
        target[start : start + 1024] = source[rows[start : start + 1024]]
    target.flush()
    del source, target
    os.replace(compact_path, folder / IMAGES_FILE)


def _write_report(folder: Path, unreadable: list[UnreadableImage]) -> None:
    with open(folder / REPORT_JSON, "w") as handle:
        json.dump({"n_unreadable": len(unreadable),
                   "files": [{"id": u.id, "path": u.path, "reason": u.reason} for u in unreadable]},
                  handle, indent=2)
    with open(folder / REPORT_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "reason"])
        for u in unreadable:
            writer.writerow([u.id, u.path, u.reason])


def _warn_unreadable(cache: ImageCache) -> None:
    if cache.unreadable:
        log.warning("skipped %d unreadable image%s, see %s", len(cache.unreadable),
                    "" if len(cache.unreadable) == 1 else "s", cache.path / REPORT_CSV)


# ---------------------------------------------------------------- opening


def _open_if_complete(folder: Path, records: list[Record], key: str) -> Optional[ImageCache]:
    """The cache in `folder` if a finished build left it there, else None."""
    try:
        with open(folder / META_FILE) as handle:
            meta = json.load(handle)
        with open(folder / INDEX_FILE, newline="") as handle:
            rows = list(csv.DictReader(handle))
        with open(folder / REPORT_JSON) as handle:
            report = json.load(handle)
        header = np.load(folder / IMAGES_FILE, mmap_mode="r")
        shape = header.shape
        del header
    except (OSError, ValueError, KeyError):
        return None
    size = int(meta.get("image_size", -1))
    if shape != (len(rows), size, size) or meta.get("n_images") != len(rows):
        log.warning("ignoring inconsistent image cache %s (images %s, %d index rows)", folder, shape, len(rows))
        return None
    by_id = {r.id: r for r in records}
    try:
        ordered = [by_id[row["id"]] for row in rows]
        geometry = [
            Geometry(int(row["orig_h"]), int(row["orig_w"]), float(row["scale_x"]), float(row["scale_y"]),
                     float(row["pad_x"]), float(row["pad_y"]))
            for row in rows
        ]
        unreadable = [UnreadableImage(f["id"], f["path"], f["reason"]) for f in report["files"]]
    except (KeyError, ValueError):
        log.warning("ignoring image cache %s: its index does not match the records (key %s)", folder, key)
        return None
    return ImageCache(folder, ordered, geometry, meta, unreadable)


# ---------------------------------------------------------------- statistics


def pixel_mean_std(cache: ImageCache, rows: Optional[Sequence[int]] = None, *, chunk_rows: int = 256) -> tuple[float, float]:
    """Mean and standard deviation of the pixels of `rows` (default: all) on the [0, 1] scale.

    Streams the memory map in chunks of rows and counts a 256-bin histogram, so the result
    is exact and memory stays at one chunk whatever the cache size.
    """
    rows = np.arange(len(cache)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        raise ValueError("pixel_mean_std needs at least one row")
    if rows.min() < 0 or rows.max() >= len(cache):
        raise IndexError(f"rows must lie in [0, {len(cache)}), got {rows.min()}..{rows.max()}")
    counts = np.zeros(256, dtype=np.int64)
    images = cache.images
    for start in range(0, rows.size, chunk_rows):
        block = images[rows[start : start + chunk_rows]]
        counts += np.bincount(block.ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    var = float((counts * (values - mean) ** 2).sum() / total)
    return mean, math.sqrt(var)

"""Decode every radiograph once into a memory-mapped cache of square uint8 arrays, so epochs only augment.

``<cache_dir>/<key>/`` holds ``images.npy`` (N, S, S), ``index.csv`` (each row's id, path, geometry and DICOM
readers.HEADER_TAGS), ``report.csv`` (unreadable files and why) and ``meta.json``; the key hashes the settings and
every record's id, path, size and mtime, so same inputs reuse the cache without opening a file. A build writes into
a hidden folder of its own (``.building-<key>-*``) renamed into place when complete, so a cache is only ever read
whole; a killed build's folder is never read (delete it to get the space back). Resize "stretch" (the reference's)
scales each axis, "letterbox" pads with black (bars that would mark the non-square Kaggle images only, a
label-correlated shortcut); INTER_AREA when shrinking (cubic aliases ribs and noise at 4x), INTER_CUBIC when growing.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import csv
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pylon import PylonError
from pylon.data import readers
from pylon.data.records import Record

log = logging.getLogger(__name__)
BUILDING_PREFIX = ".building-"


class CacheWriteError(PylonError):
    """The image cache cannot be written where data.cache_dir points (a full disk, no permission)."""


class Geometry(NamedTuple):
    """How one original image maps onto its S x S cache row: x' = x * scale_x + pad_x, w' = w * scale_x."""

    orig_h: int
    orig_w: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def points_to_original(self, points_xy: np.ndarray) -> np.ndarray:
        p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        return (p - [self.pad_x, self.pad_y]) / [self.scale_x, self.scale_y]

    def boxes_to_cache(self, boxes_xywh: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
        return b * [self.scale_x, self.scale_y, self.scale_x, self.scale_y] + [self.pad_x, self.pad_y, 0.0, 0.0]


def resize_image(image: np.ndarray, image_size: int, mode: str = "stretch") -> tuple[np.ndarray, Geometry]:
    """A 2-D uint8 image resized exactly as the cache does (also for images that never pass through one)."""
    h, w = image.shape
    if mode == "stretch":
        new_w, new_h = image_size, image_size
    else:
        scale = image_size / max(h, w)
        new_w, new_h = min(image_size, max(1, round(w * scale))), min(image_size, max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if new_w <= w and new_h <= h else cv2.INTER_CUBIC
    resized = image if (new_w, new_h) == (w, h) else cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    pad_x, pad_y = (image_size - new_w) // 2, (image_size - new_h) // 2
    out = np.zeros((image_size, image_size), dtype=np.uint8)
    out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return out, Geometry(h, w, new_w / w, new_h / h, float(pad_x), float(pad_y))


class ImageCache:
    """``records[i]`` describes ``image(i)``, ``geometry[i]`` maps between its original and cache frames;
    ``unreadable`` holds report.csv's rows. Pickling (DataLoader workers) reopens the memory map, copies no pixels."""

    def __init__(self, path: Path, records: list[Record], geometry: list[Geometry], image_size: int,
                 unreadable: list[dict[str, str]]):
        self.path, self.records, self.geometry = Path(path), records, geometry
        self.image_size, self.unreadable = image_size, unreadable
        self.labels = np.array([r.label for r in records], dtype=np.float32)
        self._boxes = [g.boxes_to_cache(r.scored_boxes).astype(np.float32) for r, g in zip(records, geometry)]
        self._images: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.ndarray:
        """The (N, S, S) uint8 array, memory-mapped read-only."""
        if self._images is None:
            self._images = np.load(self.path / "images.npy", mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        """Row i as a writable (S, S) uint8 copy."""
        return np.array(self.images[i])

    def boxes_in_cache_frame(self, i: int) -> np.ndarray:
        """Row i's scored boxes as a (k, 4) float32 array of (x, y, w, h) in cache pixels."""
        return self._boxes[i].copy()

    def to_original(self, i: int, points_xy: np.ndarray) -> np.ndarray:
        """(k, 2) points (x, y) from row i's cache frame to its original image's pixels."""
        return self.geometry[i].points_to_original(points_xy)


def build_cache(records: Sequence[Record], cache_dir: Path, *, image_size: int, resize: str = "stretch",
                workers: int = 2, progress: bool = True, complete: Callable = lambda rows, *_: rows) -> ImageCache:
    """The cache of `records` at `image_size`, built only if it does not exist yet. Unreadable files are skipped and
    listed in report.csv; its rows are the rest, as ``complete(rows, headers, sizes)`` returns them (given each
    one's readers.HEADER_TAGS as a dict and original (height, width))."""
    assert records and len({r.id for r in records}) == len(records), "records must be non-empty, ids unique"
    cache_dir = Path(cache_dir)
    key, fingerprint = cache_key(records, image_size=image_size, resize=resize)
    final = cache_dir / key
    cache = _open(final, records, complete)
    if cache is None:
        started = time.perf_counter()
        shutil.rmtree(final, ignore_errors=True)  # a folder without meta.json is not a finished build
        # a name no other build uses, so concurrent builds of one key never write into each other
        building = cache_dir / f"{BUILDING_PREFIX}{key}-{uuid.uuid4().hex}"
        try:
            building.mkdir(parents=True)
            # The images are written through a memory map, and a full disk kills a process that writes one with
            # SIGBUS ("Bus error"), not an OSError: refuse a build the disk cannot hold (images, index and report).
            needed, free = len(records) * image_size**2 + 16 * 2**20, shutil.disk_usage(cache_dir).free
            if free < needed:
                raise CacheWriteError(f"not enough free space for the image cache in {cache_dir}: it needs "
                                      f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free; free space there "
                                      "or point data.cache_dir at another folder")
            _build_into(building, records, fingerprint, image_size, resize, workers, progress)
            try:
                os.rename(building, final)
            except OSError:
                if not (final / "meta.json").exists():
                    raise  # else another process finished the same cache first: use theirs
        except OSError as error:  # a full disk, a lost mount, ...: one line, not a traceback
            raise CacheWriteError(f"cannot write the image cache in {cache_dir} ({error.strerror or error}); free "
                                  "space there or point data.cache_dir at another folder") from error
        finally:
            shutil.rmtree(building, ignore_errors=True)
        cache = _open(final, records, complete)
        log.info("built image cache %s (%d images) in %.1f s", final, len(cache), time.perf_counter() - started)
    else:
        log.info("reusing image cache %s (%d images)", final, len(cache))
    if cache.unreadable:
        n = len(cache.unreadable)
        log.warning("skipped %d unreadable image%s, see %s", n, "" if n == 1 else "s", final / "report.csv")
    return cache


def cache_key(records: Sequence[Record], *, image_size: int, resize: str) -> tuple[str, dict]:
    """Hash of everything that changes the cached pixels (and of the row order)."""
    files = []
    for record in records:
        path = os.path.abspath(record.path)
        try:
            stat = os.stat(path)
            files.append([record.id, path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([record.id, path, -1, -1])  # missing now: the build reports why
    # The names and values below are frozen: changing any of them orphans every existing cache.
    fingerprint = {"pixel_pipeline_version": 1, "reader_version": "2", "image_size": int(image_size),
                   "resize": resize, "interpolation": "area-when-shrinking/cubic-when-growing", "pad_value": 0}
    digest = hashlib.sha256(json.dumps([fingerprint, files], separators=(",", ":")).encode())
    return f"s{int(image_size)}-{resize}-{digest.hexdigest()[:16]}", fingerprint


def _build_into(folder: Path, records: list[Record], fingerprint: dict, image_size: int, resize: str,
                workers: int, progress: bool) -> None:
    n = len(records)
    images_path = folder / "images.npy"
    np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size)).flush()
    tasks = [(i, r.path) for i, r in enumerate(records)]
    chunk = max(1, min(64, math.ceil(n / (max(1, workers) * 8))))
    chunks = [tasks[s : s + chunk] for s in range(0, n, chunk)]
    outcome: dict[int, object] = {}  # row -> its index.csv columns from geometry on, or why it could not be read
    work = functools.partial(_cache_chunk, images_path, image_size, resize)
    # spawn, not fork: a process that already ran multithreaded OpenCV or torch code can deadlock its children
    with (futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1
          else contextlib.nullcontext()) as pool, \
            tqdm(total=n, desc=f"caching images at {image_size}px", unit="img", disable=not progress) as bar:
        for result in (pool.map(work, chunks) if pool else map(work, chunks)):
            outcome.update(result)
            bar.update(len(result))
    ok = [i for i in range(n) if isinstance(outcome[i], list)]
    failed = [i for i in range(n) if not isinstance(outcome[i], list)]
    if failed:  # drop the rows of unreadable files, a block of rows at a time
        source = np.load(images_path, mmap_mode="r")
        target = np.lib.format.open_memmap(folder / "compact.npy", "w+", np.uint8, (len(ok), image_size, image_size))
        for start in range(0, len(ok), 1024):
            target[start : start + 1024] = source[ok[start : start + 1024]]
        target.flush()
        del source, target
        os.replace(folder / "compact.npy", images_path)
    with open(folder / "index.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "id", "path", *Geometry._fields, *readers.HEADER_TAGS])
        writer.writerows([row, records[i].id, records[i].path, *outcome[i]] for row, i in enumerate(ok))
    with open(folder / "report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "reason"])
        writer.writerows([records[i].id, records[i].path, outcome[i]] for i in failed)
    meta = dict(fingerprint, n_images=len(ok), n_unreadable=len(failed), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _cache_chunk(images_path: Path, image_size: int, resize: str, tasks: list[tuple[int, str]]) -> dict:
    """Worker: read, resize and write a few rows; row -> its geometry and header values, or why it failed."""
    cv2.setNumThreads(1)  # the processes are the parallelism
    images = np.load(images_path, mmap_mode="r+")
    out: dict[int, object] = {}
    for i, path in tasks:
        try:
            image, header = readers.read_image_with_header(path)
            images[i], geometry = resize_image(image, image_size, resize)
            out[i] = [*geometry, *(header.get(tag, "") for tag in readers.HEADER_TAGS)]
        except readers.ImageReadError as error:
            out[i] = error.reason
    images.flush()
    return out


def _open(folder: Path, records: list[Record], complete: Callable) -> Optional[ImageCache]:
    """The cache a finished build left in `folder`, else None (so too for an index.csv without header fields)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with open(folder / "index.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        with open(folder / "report.csv", newline="") as handle:
            unreadable = list(csv.DictReader(handle))
        headers = [{tag: r[tag] for tag in readers.HEADER_TAGS} for r in rows]
    except (OSError, ValueError, KeyError):
        return None
    by_id = {r.id: r for r in records}
    geometry = [Geometry(int(r["orig_h"]), int(r["orig_w"]), *(float(r[k]) for k in Geometry._fields[2:]))
                for r in rows]
    found = complete([by_id[r["id"]] for r in rows], headers, [(g.orig_h, g.orig_w) for g in geometry])
    return ImageCache(folder, found, geometry, int(meta["image_size"]), unreadable)


def pixel_mean_std(cache: ImageCache, rows: Optional[Sequence[int]] = None, *, chunk_rows: int = 256
                   ) -> tuple[float, float]:
    """Exact mean and standard deviation of the pixels of `rows` (default: all) on the [0, 1] scale, from a
    256-bin histogram streamed a chunk of rows at a time."""
    rows = np.arange(len(cache)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, rows.size, chunk_rows):
        counts += np.bincount(cache.images[rows[start : start + chunk_rows]].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = float(np.average(values, weights=counts))
    return mean, math.sqrt(float(np.average((values - mean) ** 2, weights=counts)))

"""Augmentation, the Dataset over cache rows, its collate function and per-worker seeding.

The training recipe is the reference implementation's (rotate, random resized crop, flip, brightness/contrast, all
cubic; then (x / 255 - mean) / std). Boxes ('coco' x, y, w, h) move with the image: clipped at the border, dropped
when less than half survives a crop (the reference's ``min_visibility``). A forked DataLoader worker would inherit
the transform's generator unchanged, so a worker's first item reseeds it from torch's per-worker seed, which a seeded
loader generator fixes: same seeds, same batches.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from pylon.data.cache import ImageCache


def train_transform(image_size: int, augment_cfg: Any, *, mean: float, std: float) -> A.Compose:
    """The reference training augmentation from the config's data.augment section."""
    a, cubic = augment_cfg, cv2.INTER_CUBIC
    steps: list = []
    if a.rotate_limit > 0 and a.p_rotate > 0:
        steps.append(A.Rotate(limit=a.rotate_limit, interpolation=cubic, border_mode=cv2.BORDER_CONSTANT, fill=0,
                              p=a.p_rotate))
    steps.append(A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(a.crop_scale),
                                     ratio=tuple(a.crop_ratio), interpolation=cubic, p=1.0)
                 if a.crop_scale[0] < 1.0 else A.Resize(image_size, image_size, interpolation=cubic))
    if a.hflip > 0:
        steps.append(A.HorizontalFlip(p=a.hflip))
    if (a.brightness > 0 or a.contrast > 0) and a.p_brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=a.brightness, contrast_limit=a.contrast,
                                                p=a.p_brightness_contrast))
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), A.ToTensorV2()]
    bboxes = A.BboxParams(format="coco", min_visibility=0.5, clip=True, filter_invalid_bboxes=True)
    return A.Compose(steps, bbox_params=bboxes)


def eval_transform(image_size: int, *, mean: float, std: float) -> A.Compose:
    """Normalize only: cached images are already image_size x image_size, boxes stay put."""
    return A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), A.ToTensorV2()])


def reseed(transform: A.Compose, seed: int) -> None:
    """Give the whole pipeline one seeded random stream (``Compose.set_random_seed`` would seed every step with
    the same seed, correlating e.g. rotation and flip decisions)."""
    seed = int(seed) % 2**32
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


class CxrDataset(Dataset):
    """Items from an ImageCache: ``image`` (1, S, S) float, ``label`` (1,) float, ``boxes`` (k, 4) float
    (x, y, w, h) in the transformed image's pixels, plus ``row``, ``id`` and ``source``."""

    def __init__(self, cache: ImageCache, rows: Sequence[int], transform: Callable[..., dict]):
        self.cache, self.transform = cache, transform
        self.rows = np.asarray(rows, dtype=np.int64)
        self._seeded_for: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = get_worker_info()
        if info is not None and self._seeded_for != (info.id, info.seed):  # a worker's first item
            reseed(self.transform, info.seed)
            self._seeded_for = (info.id, info.seed)
        row = int(self.rows[index])
        boxes = self.cache.boxes_in_cache_frame(row)
        out = self.transform(image=self.cache.image(row), bboxes=boxes)
        record = self.cache.records[row]
        return {"image": out["image"], "label": torch.tensor([self.cache.labels[row]], dtype=torch.float32),
                "boxes": torch.from_numpy(np.asarray(out.get("bboxes", boxes), dtype=np.float32).reshape(-1, 4)),
                "row": row, "id": record.id, "source": record.source}


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (N, 1, S, S), labels (N, 1) and rows (N,); boxes, ids and sources stay lists."""
    out = {key: [item[key] for item in batch] for key in batch[0]}
    # default_collate stacks straight into shared memory inside a worker: one copy fewer
    out.update(image=default_collate(out["image"]), label=default_collate(out["label"]), row=torch.tensor(out["row"]))
    return out


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: keep OpenCV and torch single-threaded (the workers are the parallelism).
    Seeds need nothing here: torch seeds random and numpy in each worker, and CxrDataset its transform."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

"""Augmentation, the Dataset over cache rows, its collate function and per-worker seeding.

The training recipe is the reference implementation's (rotate, random resized crop, flip,
brightness/contrast, all cubic; then (x / 255 - mean) / std as a (1, S, S) float tensor). Boxes
('coco' x, y, w, h) move with the image: clipped at the border, dropped when less than half
survives a crop (the reference's ``min_visibility``). A forked DataLoader worker would inherit
the transform's generator unchanged, so each item reseeds it, on first use in a worker, from
torch's per-worker seed, which a seeded loader generator fixes: same seeds, same batches.
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

Item = dict[str, Any]


def train_transform(image_size: int, augment_cfg: Any, *, mean: float, std: float) -> A.Compose:
    """The reference training augmentation from the config's data.augment section."""
    a, cubic = augment_cfg, cv2.INTER_CUBIC
    steps: list = []
    if a.rotate_limit > 0 and a.p_rotate > 0:
        steps.append(A.Rotate(limit=a.rotate_limit, interpolation=cubic, border_mode=cv2.BORDER_CONSTANT, fill=0,
                              p=a.p_rotate))
    low, high = (float(v) for v in a.crop_scale)
    if low < 1.0:
        steps.append(A.RandomResizedCrop(size=(image_size, image_size), scale=(low, high), ratio=tuple(a.crop_ratio),
                                         interpolation=cubic, p=1.0))
    else:
        steps.append(A.Resize(image_size, image_size, interpolation=cubic))
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
    """Give the whole pipeline one seeded random stream (``Compose.set_random_seed`` would seed
    every step with the same seed, correlating e.g. rotation and flip decisions)."""
    seed = int(seed) % 2**32
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


class CxrDataset(Dataset):
    """Items from an ImageCache: ``image`` (1, S, S) float, ``label`` (1,) float, ``boxes`` (k, 4)
    float (x, y, w, h) in the transformed image's pixels, plus ``row``, ``id`` and ``source``."""

    def __init__(self, cache: ImageCache, rows: Sequence[int], transform: Callable[..., dict]):
        self.cache, self.transform = cache, transform
        self.rows = np.asarray(rows, dtype=np.int64)
        self._seeded_for: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def labels(self) -> np.ndarray:
        return self.cache.labels[self.rows]

    def reseed(self, seed: int) -> None:
        """Restart the transform's random stream (main-process loading; workers seed themselves)."""
        reseed(self.transform, seed)

    def _seed_for_worker(self) -> None:
        info = get_worker_info()
        if info is not None and self._seeded_for != (info.id, info.seed):
            self.reseed(info.seed)
            self._seeded_for = (info.id, info.seed)

    def __getitem__(self, index: int) -> Item:
        self._seed_for_worker()
        row = int(self.rows[index])
        boxes = self.cache.boxes_in_cache_frame(row)
        out = self.transform(image=self.cache.image(row), bboxes=boxes)
        return {
            "image": out["image"],
            "label": torch.tensor([self.cache.labels[row]], dtype=torch.float32),
            "boxes": torch.from_numpy(np.asarray(out.get("bboxes", boxes), dtype=np.float32).reshape(-1, 4)),
            "row": row,
            "id": self.cache.records[row].id,
            "source": self.cache.sources[row],
        }


def collate(batch: Sequence[Item]) -> Item:
    """Stack images (N, 1, S, S) and labels (N, 1); boxes stay a list of (k, 4) tensors."""
    # default_collate stacks straight into shared memory inside a worker: one copy fewer
    return {
        "image": default_collate([b["image"] for b in batch]),
        "label": default_collate([b["label"] for b in batch]),
        "boxes": [b["boxes"] for b in batch],
        "row": torch.tensor([b["row"] for b in batch], dtype=torch.int64),
        "id": [b["id"] for b in batch],
        "source": [b["source"] for b in batch],
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy/random/the transform from torch's worker seed;
    keep OpenCV and torch single-threaded (the workers are the parallelism)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, CxrDataset):
        info.dataset._seed_for_worker()

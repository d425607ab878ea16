"""Torch Dataset over cache rows, its collate function, seeding and class-balance helpers.

An item costs one memory-mapped row read plus one albumentations call (well under a
millisecond at 256 px on one core), so the loader is never what a GPU waits for. The
per-item path stays free of Python work that grows with the data: labels, sources and
cache-frame boxes are precomputed arrays on the cache.

Reproducibility: albumentations draws from the transform's own generator, which a forked
DataLoader worker would inherit unchanged (so every worker would repeat the same
augmentations). Each item therefore checks which worker it runs in and, on first use there,
reseeds the transform from torch's per-worker seed; ``seed_worker`` also seeds numpy and
``random`` for any other code. Given a seeded ``torch.Generator`` (``make_loader`` does
this), the augmentations are the same on every run.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler, default_collate, get_worker_info

from pylon.data.cache import ImageCache
from pylon.data.records import Record
from pylon.data.transforms import eval_transform, reseed

Item = dict[str, Any]


class CxrDataset(Dataset):
    """Items from an ImageCache: ``image`` (1, S, S) float, ``label`` (1,) float, ``boxes`` (k, 4)
    float (x, y, w, h) in the transformed image's pixels, plus ``row``, ``id`` and ``source``.
    """

    def __init__(self, cache: ImageCache, rows: Optional[Sequence[int]] = None,
                 transform: Optional[Callable[..., dict]] = None):
        self.cache = cache
        self.rows = np.arange(len(cache), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.ndim != 1:
            raise ValueError(f"rows must be a 1-D sequence of cache rows, got shape {self.rows.shape}")
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(cache)):
            raise IndexError(f"rows must lie in [0, {len(cache)}) for cache {cache.path}")
        self.transform = transform if transform is not None else eval_transform(cache.image_size)
        self._seeded_for: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def labels(self) -> np.ndarray:
        """Labels of this dataset's items, in item order (for samplers and prevalence)."""
        return self.cache.labels[self.rows]

    def reseed(self, seed: int) -> None:
        """Restart the transform's random stream at `seed` (for loading in the main process;
        workers reseed themselves from torch's per-worker seed)."""
        if hasattr(self.transform, "set_random_state"):
            reseed(self.transform, seed)

    def _seed_for_worker(self) -> None:
        info = get_worker_info()
        if info is None:
            return
        tag = (info.id, info.seed)
        if self._seeded_for != tag:
            self.reseed(info.seed)
            self._seeded_for = tag

    def __getitem__(self, index: int) -> Item:
        self._seed_for_worker()
        row = int(self.rows[index])
        image = self.cache.image(row)
        boxes = self.cache.boxes_in_cache_frame(row)
        out = self.transform(image=image, bboxes=boxes)
        tensor = out["image"]
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.from_numpy(np.ascontiguousarray(tensor))
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        out_boxes = np.asarray(out.get("bboxes", boxes), dtype=np.float32).reshape(-1, 4)
        return {
            "image": tensor,
            "label": torch.tensor([self.cache.labels[row]], dtype=torch.float32),
            "boxes": torch.from_numpy(out_boxes),
            "row": row,
            "id": self.cache.records[row].id,
            "source": self.cache.sources[row],
        }


def collate(batch: Sequence[Item]) -> Item:
    """Stack images (N, 1, S, S) and labels (N, 1); keep boxes as a list of (k, 4) tensors."""
    # default_collate stacks straight into shared memory inside a worker, which saves the
    # DataLoader a second copy of every batch on its way to the main process.
    return {
        "image": default_collate([b["image"] for b in batch]),
        "label": default_collate([b["label"] for b in batch]),
        "boxes": [b["boxes"] for b in batch],
        "row": torch.tensor([b["row"] for b in batch], dtype=torch.int64),
        "id": [b["id"] for b in batch],
        "source": [b["source"] for b in batch],
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy/random/the transform from torch's worker seed,
    and keep OpenCV and torch single-threaded (the workers are the parallelism)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, CxrDataset):
        info.dataset._seed_for_worker()


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 2,
    seed: int = 0,
    sampler: Optional[Sampler] = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader with this module's collate and reproducible, per-worker seeding."""
    generator = torch.Generator().manual_seed(int(seed))
    if workers == 0 and isinstance(dataset, CxrDataset):
        dataset.reseed(seed)  # main-process loading: one seeded stream
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0,
    )


# ---------------------------------------------------------------- class balance


def _labels_of(records_or_labels: Union[Sequence[Record], Sequence[float], np.ndarray]) -> np.ndarray:
    items = list(records_or_labels) if not isinstance(records_or_labels, np.ndarray) else records_or_labels
    if len(items) and isinstance(items[0], Record):
        labels = np.array([r.label for r in items], dtype=np.float64)
    else:
        labels = np.asarray(items, dtype=np.float64).reshape(-1)
    if labels.size == 0:
        raise ValueError("no labels given")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(labels.tolist()) - {0.0, 1.0})[:5]}")
    return labels


def prevalence(records_or_labels: Union[Sequence[Record], Sequence[float], np.ndarray]) -> float:
    """Fraction of positives (label 1)."""
    return float(_labels_of(records_or_labels).mean())


def pos_weight_from_prevalence(p: float) -> float:
    """BCE ``pos_weight`` that balances the classes: negatives per positive, (1 - p) / p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"prevalence must lie strictly between 0 and 1 to weight classes, got {p!r}")
    return (1.0 - p) / p


def balanced_sampler(labels: Union[Sequence[float], np.ndarray], seed: int,
                     num_samples: Optional[int] = None) -> WeightedRandomSampler:
    """Draw (with replacement) positives and negatives equally often, seeded."""
    labels = _labels_of(labels)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a balanced sampler needs both classes, got {n_pos} positive and {n_neg} negative")
    weights = np.where(labels == 1.0, 0.5 / n_pos, 0.5 / n_neg)
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=int(num_samples or labels.size),
        replacement=True,
        generator=torch.Generator().manual_seed(int(seed)),
    )

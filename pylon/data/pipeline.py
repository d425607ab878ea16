"""From the ``data`` config section to DataLoaders: index -> split -> cache -> Dataset.

train.py and evaluate.py both start here, so the split and the cached pixels a model is
evaluated on are exactly the ones it was selected on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pylon.config import ConfigError
from pylon.data.cache import ImageCache, build_cache, pixel_mean_std
from pylon.data.dataset import CxrDataset, balanced_sampler, prevalence
from pylon.data.dataset import make_loader as make_dataset_loader
from pylon.data.kaggle import index_kaggle
from pylon.data.records import Record
from pylon.data.rsna import index_rsna
from pylon.data.splits import split_records
from pylon.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
ALL = "all"  # every image of the sources, unsplit: external evaluation


@dataclass
class PreparedData:
    cache: ImageCache
    rows: dict[str, np.ndarray]
    mean: float
    std: float

    def records(self, split: str) -> list[Record]:
        return [self.cache.records[i] for i in self.rows[split]]

    def labels(self, split: str) -> np.ndarray:
        return np.array([r.label for r in self.records(split)], dtype=np.int64)

    def summary(self) -> str:
        parts = []
        for split in SPLITS:
            recs = self.records(split)
            by_source = {s: sum(r.source == s for r in recs) for s in ("kaggle", "rsna")}
            n_pos = sum(r.label for r in recs)
            sources = ", ".join(f"{k} {v}" for k, v in by_source.items() if v)
            parts.append(f"{split}: {len(recs)} images ({n_pos} positive; {sources})")
        return "; ".join(parts)


def _require_root(key: str, root: Optional[str], marker: str) -> Path:
    if root is None:
        raise ConfigError(f"data.{key} is null but its source is listed in data.sources")
    path = Path(root)
    if not (path / marker).exists():
        raise ConfigError(
            f"data.{key}: {path} has no {marker} - download the data as datasets/README.md "
            f"describes, or point at it with --set data.{key}=/path/to/it"
        )
    return path


def _maybe_generate_demo(data_cfg: Any) -> None:
    roots = [Path(r) for r in (data_cfg.kaggle_root, data_cfg.rsna_root) if r is not None]
    parents = {r.parent for r in roots}
    if len(parents) != 1 or {r.name for r in roots} - {"kaggle", "rsna"}:
        raise ConfigError("data.generate_demo needs data.kaggle_root and data.rsna_root to be <dir>/kaggle and <dir>/rsna")
    from pylon.data.synthetic import generate_demo, is_generated_demo

    demo_root = parents.pop()
    # A demo set made earlier (with any generator settings) is used as it is.
    if not is_generated_demo(demo_root):
        generate_demo(demo_root)


def index_sources(data_cfg: Any, *, split: bool = True) -> list[Record]:
    """Every configured source, indexed and (unless ``split=False``) split by patient."""
    if data_cfg.generate_demo:
        _maybe_generate_demo(data_cfg)
    records: list[Record] = []
    if "kaggle" in data_cfg.sources:
        records += index_kaggle(_require_root("kaggle_root", data_cfg.kaggle_root, "chest_xray"))
    if "rsna" in data_cfg.sources:
        rsna_root = _require_root("rsna_root", data_cfg.rsna_root, "stage_2_train_labels.csv")
        records += index_rsna(rsna_root, header_cache=Path(data_cfg.cache_dir) / "rsna_headers.csv")
    if not split:
        return [r.with_split(ALL) for r in records]
    return split_records(
        records,
        val_fraction=data_cfg.val_fraction,
        rsna_test_fraction=data_cfg.rsna_test_fraction,
        seed=data_cfg.split_seed,
    )


def prepare_data(data_cfg: Any, *, progress: bool = True, split: bool = True) -> PreparedData:
    """The cached data of ``data_cfg``, split by patient; with ``split=False`` every readable
    image is in one ``"all"`` split (scoring a trained run on another data set)."""
    records = index_sources(data_cfg, split=split)
    cache = build_cache(
        records,
        Path(data_cfg.cache_dir),
        image_size=data_cfg.image_size,
        resize=data_cfg.resize,
        workers=max(1, data_cfg.num_workers),
        progress=progress,
    )
    split_of = np.array([r.split for r in cache.records])
    if not split:
        return PreparedData(cache, {ALL: np.arange(len(cache.records))}, float(data_cfg.mean), float(data_cfg.std))
    rows = {name: np.flatnonzero(split_of == name) for name in SPLITS}
    for name in ("train", "val"):
        if len(rows[name]) == 0:
            raise ConfigError(f"the {name} split is empty: check data.sources and the data roots")
    mean, std = data_cfg.mean, data_cfg.std
    if data_cfg.normalize_from_train:
        mean, std = pixel_mean_std(cache, rows["train"])
        log.info("normalisation from the training split: mean %.4f, std %.4f", mean, std)
    return PreparedData(cache, rows, float(mean), float(std))


def train_prevalence(data: PreparedData) -> float:
    return prevalence(data.labels("train"))


def split_loader(
    data: PreparedData,
    split: str,
    data_cfg: Any,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader over one split; call ``set_loader_epoch`` before each epoch for reproducible order.

    Evaluation loaders shard rows across processes without padding (every image once).
    """
    rows = data.rows[split]
    aug = data_cfg.augment
    if train and aug.enabled:
        transform = train_transform(
            data_cfg.image_size,
            rotate_limit=aug.rotate_limit,
            p_rotate=aug.p_rotate,
            crop_scale=tuple(aug.crop_scale),
            crop_ratio=tuple(aug.crop_ratio),
            hflip=aug.hflip,
            brightness=aug.brightness,
            contrast=aug.contrast,
            p_brightness_contrast=aug.p_brightness_contrast,
            mean=data.mean,
            std=data.std,
        )
    else:
        transform = eval_transform(data_cfg.image_size, mean=data.mean, std=data.std)
    if not train:
        rows = rows[rank::world_size]
    dataset = CxrDataset(data.cache, rows, transform)
    sampler = None
    if train and data_cfg.balanced_sampler:
        if world_size > 1:
            raise ConfigError("data.balanced_sampler is not supported with several processes yet")
        sampler = balanced_sampler(dataset.labels, seed=seed)
    elif train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if data_cfg.num_workers > 0:
        # OpenCV's thread pool does not survive fork: a worker that reconfigures it (as
        # seed_worker does) can wait forever on a condition variable copied from a parent
        # thread that was mid-wait. The augmentation runs in the workers anyway, so the
        # parent stops its pool before any worker is forked.
        cv2.setNumThreads(1)
    return make_dataset_loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        workers=data_cfg.num_workers,
        # Each process draws its own augmentations; the sampler already splits the images.
        seed=seed + rank,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
    )


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make an epoch's order and augmentation a function of (seed, epoch) alone, so resume is exact."""
    epoch_seed = (seed * 100_003 + epoch) * 1_009 + rank
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif getattr(loader.sampler, "generator", None) is not None:
        loader.sampler.generator.manual_seed(epoch_seed)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    if loader.num_workers == 0:
        loader.dataset.reseed(epoch_seed)

"""From the ``data`` config section to DataLoaders: index -> split -> cache -> Dataset. train.py and
evaluate.py both start here, so a model is evaluated on exactly the split and pixels it was selected on."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, WeightedRandomSampler

from pylon import ConfigError
from pylon.data.cache import ImageCache, build_cache, pixel_mean_std
from pylon.data.dataset import CxrDataset, collate, eval_transform, reseed, seed_worker, train_transform
from pylon.data.records import Record, with_patient_map
from pylon.data.sources import SOURCES, complete_records
from pylon.data.splits import split_records

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

    def prevalence(self, split: str) -> float:
        return float(np.mean(self.cache.labels[self.rows[split]], dtype=np.float64))

    def summary(self) -> str:
        def one(split: str, records: list[Record]) -> str:
            sources = ", ".join(f"{name} {n}" for name, n in Counter(r.source for r in records).items())
            return f"{split}: {len(records)} images ({sum(r.label for r in records)} positive; {sources})"
        return "; ".join(one(split, self.records(split)) for split in self.rows)


def index_sources(data_cfg: Any, *, split: bool = True) -> list[Record]:
    """Every configured source, indexed and (unless ``split=False``) split by patient."""
    records: list[Record] = []
    for name, source in SOURCES.items():  # registry order, whatever the config's order
        if name not in data_cfg.sources:
            continue
        root, key = data_cfg.roots.get(name), f"data.roots.{name}"
        if root is None:
            raise ConfigError(f"{key} is not set but {name} is listed in data.sources; give its folder with "
                              f"--set {key}=/path/to/it")
        root = Path(root)
        if not (root / source.MARKER).exists():
            how = f"download the data as datasets/README.md describes, or point at it with --set {key}=/path/to/it"
            if root.parent.name == "demo" and root.name == name:  # as tools/make_demo.py lays the demo set out
                how = (f"the demo data is generated, not downloaded: run python tools/make_demo.py --out {root.parent} "
                       "(or make demo, which writes datasets/demo)")
            raise ConfigError(f"{key}: {root} has no {source.MARKER} - {how}")
        indexed = source.index(root)
        if not indexed:
            raise ConfigError(f"{key}: no {name} images found under {root}")
        if name in data_cfg.patient_maps:
            indexed = with_patient_map(indexed, root / data_cfg.patient_maps[name], f"data.patient_maps.{name}")
        elif source.IDS_NAME_FILMS:
            log.info("%s: no data.patient_maps entry, so each image id counts as its own patient", name)
        records += indexed
    if not split:
        return [replace(r, split=ALL) for r in records]
    return split_records(records, val_fraction=data_cfg.val_fraction, test_fraction=data_cfg.test_fraction,
                         seed=data_cfg.split_seed, folds=(data_cfg.folds, data_cfg.fold) if data_cfg.folds else None)


def prepare_data(data_cfg: Any, *, progress: bool = True, split: bool = True,
                 normalization: Optional[tuple[float, float]] = None) -> PreparedData:
    """The cached data of ``data_cfg``, split by patient; with ``split=False`` every readable image is in one
    ``"all"`` split (scoring a trained run on another data set). Inputs are normalised by ``normalization``
    (mean, std) where given (a trained model's own), else by data.mean and data.std, or by the training
    split's with data.normalize_from_train."""
    records = index_sources(data_cfg, split=split)
    cache = build_cache(records, Path(data_cfg.cache_dir), image_size=data_cfg.image_size, resize=data_cfg.resize,
                        workers=max(1, data_cfg.num_workers), progress=progress, complete=complete_records)
    rows = {ALL: np.arange(len(cache))}
    if split:
        split_of = np.array([r.split for r in cache.records])
        rows = {name: np.flatnonzero(split_of == name) for name in SPLITS}
        for name in ("train", "val"):
            if len(rows[name]) == 0:
                raise ConfigError(f"the {name} split is empty: {_why_empty(name, cache, data_cfg)}")
        if normalization is None and data_cfg.normalize_from_train:
            normalization = pixel_mean_std(cache, rows["train"])
            log.info("normalisation from the training split: mean %.4f, std %.4f", *normalization)
    mean, std = normalization or (data_cfg.mean, data_cfg.std)
    return PreparedData(cache, rows, float(mean), float(std))


def _why_empty(split: str, cache: ImageCache, data_cfg: Any) -> str:
    """The cause of an empty split, and what to change, for its error message."""
    if not len(cache):
        return f"none of the images could be read, see {cache.path / 'report.csv'}"
    patients = Counter(source for source, _ in {(r.source, r.patient_id) for r in cache.records})
    counts = " and ".join(f"{n} {source}" for source, n in sorted(patients.items()))
    if split == "val":
        return (f"data.val_fraction={data_cfg.val_fraction} of {counts} patients rounds to none; raise "
                "data.val_fraction or add data")
    return (f"data.val_fraction={data_cfg.val_fraction} and data.test_fraction={data_cfg.test_fraction} "
            f"of {counts} patients leave none for training; lower them or add data")


def split_loader(data: PreparedData, split: str, data_cfg: Any, batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over one split; call ``set_loader_epoch`` before each epoch for reproducible order. Evaluation
    loaders shard rows across processes without padding (every image once). Training draws are shuffled or,
    with data.source_shares or data.balanced_sampler, drawn with replacement as ``draw_weights`` says."""
    if not train:
        return rows_loader(data, data.rows[split][rank::world_size], data_cfg, batch_size, seed=seed + rank)
    transform = (train_transform(data_cfg.image_size, data_cfg.augment, mean=data.mean, std=data.std)
                 if data_cfg.augment.enabled else eval_transform(data_cfg.image_size, mean=data.mean, std=data.std))
    dataset = CxrDataset(data.cache, data.rows[split], transform)
    if data_cfg.balanced_sampler or data_cfg.source_shares:
        weights = torch.as_tensor(draw_weights(data, split, data_cfg), dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True,
                                        generator=torch.Generator().manual_seed(int(seed)))
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
    # Each process draws its own augmentations; the sampler already splits the images.
    return _loader(dataset, sampler, data_cfg, batch_size, seed + rank)


def rows_loader(data: PreparedData, rows: np.ndarray, data_cfg: Any, batch_size: int, *, seed: int = 0) -> DataLoader:
    """An evaluation loader over the cache ``rows``, in their order and unaugmented."""
    dataset = CxrDataset(data.cache, rows, eval_transform(data_cfg.image_size, mean=data.mean, std=data.std))
    return _loader(dataset, None, data_cfg, batch_size, seed)


def _loader(dataset: CxrDataset, sampler: Optional[Sampler], data_cfg: Any, batch_size: int, seed: int) -> DataLoader:
    """The DataLoader of both kinds: a training one has a sampler and drops its last partial batch."""
    if data_cfg.num_workers > 0:
        # OpenCV's thread pool does not survive fork: a worker that reconfigures it (as seed_worker does)
        # can wait forever on a condition copied mid-wait from a parent thread
        cv2.setNumThreads(1)
    else:
        reseed(dataset.transform, seed)  # main-process loading: one seeded stream (workers seed themselves)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=data_cfg.num_workers,
                      collate_fn=collate, worker_init_fn=seed_worker, drop_last=sampler is not None,
                      generator=torch.Generator().manual_seed(int(seed)), pin_memory=torch.cuda.is_available())


def draw_weights(data: PreparedData, split: str, data_cfg: Any) -> np.ndarray:
    """Each image's chance of a training draw: ``data.source_shares`` divides the draws between the sources
    (normalised; {}: the split as one group) and, within each, ``data.balanced_sampler`` halves them between
    positives and negatives; a group's images share its part equally."""
    rows = data.rows[split]
    labels = data.cache.labels[rows].astype(np.float64)
    sources = np.array([data.cache.records[r].source for r in rows])
    shares = dict(data_cfg.source_shares) or {None: 1.0}
    total = sum(shares.values())
    weights = np.zeros(len(rows), dtype=np.float64)
    for source, share in shares.items():
        members = np.ones(len(rows), bool) if source is None else sources == source
        n_pos, n = int(labels[members].sum()), int(members.sum())
        where = f"the {source} images of {split}" if source is not None else split
        if n == 0:
            raise ConfigError(f"data.source_shares gives {source} a share but {split} has no {source} images")
        if data_cfg.balanced_sampler and n_pos in (0, n):
            raise ConfigError(f"data.balanced_sampler needs both classes in {where}: {n_pos} of {n} positive")
        classes = [members & (labels == 1.0), members & (labels != 1.0)] if data_cfg.balanced_sampler else [members]
        for group in classes:
            weights[group] = share / total / len(classes) / int(group.sum())
    return weights


def describe_draws(data: PreparedData, split: str, data_cfg: Any) -> str:
    """Each source's share of an epoch's draws, for the line a run prints at its start."""
    rows = data.rows[split]
    sources = np.array([data.cache.records[r].source for r in rows])
    weights = draw_weights(data, split, data_cfg)  # neither option: uniform, what shuffling draws on average
    how = "data.source_shares" if data_cfg.source_shares else "in proportion to the images"
    parts = ", ".join(f"{name} {weights[sources == name].sum():.1%} ({int((sources == name).sum())} images)"
                      for name in sorted(set(sources)))
    return f"training draws per source ({how}): {parts}"


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make an epoch's order and augmentation a function of (seed, epoch) alone, so resume is exact."""
    epoch_seed = (seed * 100_003 + epoch) * 1_009 + rank
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif getattr(loader.sampler, "generator", None) is not None:
        loader.sampler.generator.manual_seed(epoch_seed)
    loader.generator.manual_seed(epoch_seed)
    if loader.num_workers == 0:
        reseed(loader.dataset.transform, epoch_seed)

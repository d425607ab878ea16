"""The cached Dataset and loaders: item format, normalization, boxes under augmentation, seeding,
sampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pylon.config import AugmentConfig, DataConfig
from pylon.data.cache import build_cache
from pylon.data.dataset import CxrDataset, collate, eval_transform, reseed, train_transform
from pylon.data.pipeline import PreparedData, rows_loader, set_loader_epoch, split_loader
from pylon.data.records import Box, Record

SIZE = 64
DARK, BRIGHT = 20, 250
MEAN, STD = 0.4984, 0.2483


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Eight PNGs of mixed shapes; odd ones are positives with a bright square at their box."""
    folder: Path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        h, w = (80, 120) if i % 2 else (120, 100)
        array = rng.integers(DARK, DARK + 30, size=(h, w)).astype(np.uint8)
        boxes = ()
        if i % 2:
            box = (30 + 5 * i, 20, 36, 30)
            x, y, bw, bh = box
            array[:] = 0
            array[y : y + bh, x : x + bw] = BRIGHT
            boxes = (Box(*box),)
        path = folder / f"img{i}.png"
        Image.fromarray(array).save(path)
        records.append(Record(id=f"img{i}", patient_id=f"p{i}", source="rsna" if i < 4 else "kaggle",
                              path=str(path), label=i % 2, boxes=boxes, split="train"))
    return build_cache(records, folder / "cache", image_size=SIZE, resize="stretch", workers=1, progress=False)


def test_items_have_the_documented_shapes_and_types(cache):
    dataset = CxrDataset(cache, [0, 1, 5], eval_transform(SIZE, mean=MEAN, std=STD))
    assert len(dataset) == 3
    item = dataset[1]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1,) and item["label"].dtype == torch.float32 and item["label"].item() == 1.0
    assert item["boxes"].shape == (1, 4) and item["boxes"].dtype == torch.float32
    assert item["row"] == 1 and item["id"] == "img1" and item["source"] == "rsna"
    assert dataset[0]["boxes"].shape == (0, 4) and dataset[2]["source"] == "kaggle"
    np.testing.assert_allclose(item["boxes"].numpy(), cache.boxes_in_cache_frame(1), rtol=1e-6)

    batch = collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, SIZE, SIZE) and batch["label"].shape == (3, 1)
    assert [b.shape[0] for b in batch["boxes"]] == [0, 1, 1]
    assert batch["row"].tolist() == [0, 1, 5] and batch["id"] == ["img0", "img1", "img5"]


def test_eval_transform_normalizes_and_is_deterministic(cache):
    dataset = CxrDataset(cache, range(8), eval_transform(SIZE, mean=0.3, std=0.2))
    expected = (cache.image(2).astype(np.float32) / 255.0 - 0.3) / 0.2
    first, second = dataset[2]["image"], dataset[2]["image"]
    np.testing.assert_allclose(first[0].numpy(), expected, atol=1e-5)
    assert torch.equal(first, second)


def test_train_augmentation_moves_boxes_with_the_image(cache):
    # Geometry only (rotation, crop, flip always on) so bright pixels mark the square exactly.
    augment = AugmentConfig(p_rotate=1.0, rotate_limit=45, hflip=0.5, brightness=0, contrast=0)
    transform = train_transform(SIZE, augment, mean=MEAN, std=STD)
    dataset = CxrDataset(cache, [1, 3, 5, 7], transform)
    reseed(transform, 0)
    bright_level = (0.5 - MEAN) / STD
    kept = 0
    for trial in range(40):
        item = dataset[trial % 4]
        image = item["image"][0].numpy()
        ys, xs = np.nonzero(image > bright_level)
        if len(item["boxes"]) == 0:
            continue  # less than half the square survived the crop: the box is dropped
        kept += 1
        x, y, w, h = item["boxes"][0].tolist()
        assert len(xs) > 0
        # every bright pixel lies in the moved box (1.5 px slack for cubic resampling)
        assert xs.min() >= x - 1.5 and xs.max() + 1 <= x + w + 1.5, (trial, x, w, xs.min(), xs.max())
        assert ys.min() >= y - 1.5 and ys.max() + 1 <= y + h + 1.5, (trial, y, h, ys.min(), ys.max())
        # and the box is not much larger than the bright region (rotation's corner box at most)
        assert w * h <= 2.5 * (np.ptp(xs) + 1) * (np.ptp(ys) + 1)
    assert kept >= 20


def test_train_transform_changes_images_and_keeps_the_output_format(cache):
    transform = train_transform(SIZE, AugmentConfig(), mean=MEAN, std=STD)
    reseed(transform, 1)
    dataset = CxrDataset(cache, [0], transform)
    images = [dataset[0]["image"] for _ in range(6)]
    assert all(im.shape == (1, SIZE, SIZE) and im.dtype == torch.float32 for im in images)
    assert len({im.numpy().tobytes() for im in images}) > 1


def test_train_transform_has_the_reference_steps():
    steps = train_transform(SIZE, AugmentConfig(), mean=MEAN, std=STD).transforms
    assert [type(t).__name__ for t in steps] == ["Rotate", "RandomResizedCrop", "HorizontalFlip",
                                                 "RandomBrightnessContrast", "Normalize", "ToTensorV2"]
    rotate, crop, flip, light = steps[:4]
    assert (rotate.limit, rotate.p, rotate.interpolation) == ((-90, 90), 0.5, 2)  # 2: cubic
    assert (crop.scale, crop.ratio, crop.size) == ((0.7, 1.0), pytest.approx((0.75, 4 / 3)), (SIZE, SIZE))
    assert flip.p == 0.5 and (light.brightness_limit, light.contrast_limit, light.p) == ((-0.5, 0.5), (-0.5, 0.5), 0.5)
    off = AugmentConfig(rotate_limit=0, crop_scale=(1.0, 1.0), hflip=0, p_brightness_contrast=0)
    assert [type(t).__name__ for t in train_transform(SIZE, off, mean=MEAN, std=STD).transforms] == [
        "Resize", "Normalize", "ToTensorV2"]


def data_cfg(**overrides) -> DataConfig:
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"image_size": SIZE, **overrides})


def _epoch(loader, epoch: int = 0) -> tuple[list[str], torch.Tensor]:
    set_loader_epoch(loader, 7, epoch)
    ids, images = [], []
    for batch in loader:
        ids += batch["id"]
        images.append(batch["image"])
    return ids, torch.cat(images)


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_are_reproducible_and_workers_differ(cache, workers):
    data = PreparedData(cache, {"train": np.arange(8), "same": np.zeros(4, np.int64)}, MEAN, STD)
    cfg = data_cfg(num_workers=workers)
    ids_a, images_a = _epoch(split_loader(data, "train", cfg, 2, train=True, seed=7))
    ids_b, images_b = _epoch(split_loader(data, "train", cfg, 2, train=True, seed=7))
    assert ids_a == ids_b and torch.equal(images_a, images_b)
    assert images_a.shape == (8, 1, SIZE, SIZE) and sorted(ids_a) == [f"img{i}" for i in range(8)]
    ids_c, images_c = _epoch(split_loader(data, "train", cfg, 2, train=True, seed=7), epoch=1)
    assert ids_c != ids_a and not torch.equal(images_a, images_c)
    # The same row twice must not get the same augmentation (in particular not from two forked workers).
    _, images = _epoch(split_loader(data, "same", cfg, 1, train=True, seed=3))
    assert not torch.equal(images[0], images[1])


def test_eval_loader_shards_without_padding(cache):
    data = PreparedData(cache, {"val": np.arange(7)}, MEAN, STD)
    cfg = data_cfg(num_workers=0)
    loaders = [split_loader(data, "val", cfg, 3, train=False, rank=k, world_size=2) for k in (0, 1)]
    shards = [[row for batch in loader for row in batch["row"].tolist()] for loader in loaders]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]


def test_rows_loader_gives_its_rows_in_order_unaugmented(cache):
    data = PreparedData(cache, {}, MEAN, STD)
    batches = list(rows_loader(data, np.array([5, 1, 3]), data_cfg(num_workers=0), 2))
    assert [row for batch in batches for row in batch["row"].tolist()] == [5, 1, 3]
    expected = eval_transform(SIZE, mean=MEAN, std=STD)(image=cache.image(5))["image"]
    assert torch.equal(batches[0]["image"][0], expected)


def test_balanced_sampler_draws_both_classes_equally(cache):
    rows = np.array([1] + [0, 2, 4, 6] * 4)  # 1 positive in 17
    data = PreparedData(cache, {"train": rows}, MEAN, STD)
    loader = split_loader(data, "train", data_cfg(num_workers=0, balanced_sampler=True), 17, train=True, seed=0)
    drawn = np.concatenate([np.array(list(loader.sampler)) for _ in range(100)])
    assert 0.45 < cache.labels[rows[drawn]].mean() < 0.55
    assert data.prevalence("train") == pytest.approx(1 / 17)


def _drawn_sources(loader, epochs: int) -> list[list[str]]:
    """The sources of the images each epoch's batches hold, epoch by epoch."""
    drawn = []
    for epoch in range(epochs):
        set_loader_epoch(loader, 0, epoch)
        drawn.append([source for batch in loader for source in batch["source"]])
    return drawn


@pytest.mark.parametrize("balanced", [False, True])
def test_source_shares_set_each_sources_part_of_the_draws(cache, balanced):
    rows = np.array([0, 1] + [4, 6] * 7 + [5])  # rsna: 2 images of 17, one positive; kaggle: 15, one positive
    data = PreparedData(cache, {"train": rows}, MEAN, STD)
    cfg = data_cfg(num_workers=0, source_shares={"rsna": 1.0, "kaggle": 3.0}, balanced_sampler=balanced)
    loader = split_loader(data, "train", cfg, len(rows), train=True, seed=0)
    epochs = _drawn_sources(loader, 20)
    assert all(len(sources) == len(rows) for sources in epochs)  # an epoch draws as many as the split holds
    rsna = np.mean([s == "rsna" for sources in epochs for s in sources])
    assert 0.15 < rsna < 0.35  # asked 1/4; in proportion to the images it would be 2/17
    assert _drawn_sources(loader, 2) == epochs[:2] and epochs[0] != epochs[1]  # a function of (seed, epoch)
    if balanced:  # within each source, positives and negatives halve its share
        drawn = np.concatenate([np.array(list(loader.sampler)) for _ in range(50)])
        for source in ("rsna", "kaggle"):
            labels = [cache.labels[r] for r in rows[drawn] if cache.records[r].source == source]
            assert 0.4 < np.mean(labels) < 0.6, source


def test_shares_or_a_selection_the_split_cannot_meet_are_refused_by_key(cache):
    from pylon.config import ConfigError, load_config
    from pylon.engine import check_selection

    rsna_only = np.array([0, 1, 2, 3])
    data = PreparedData(cache, {"train": rsna_only, "val": rsna_only}, MEAN, STD)
    with pytest.raises(ConfigError, match=r"data.source_shares gives kaggle a share but train has no kaggle images"):
        split_loader(data, "train", data_cfg(num_workers=0, source_shares={"rsna": 1.0, "kaggle": 1.0}), 2, train=True)
    one_class = PreparedData(cache, {"train": np.array([0, 1, 4, 6])}, MEAN, STD)  # kaggle: negatives only
    with pytest.raises(ConfigError, match=r"data.balanced_sampler needs both classes in the kaggle images of train"):
        split_loader(one_class, "train", data_cfg(num_workers=0, source_shares={"rsna": 1.0, "kaggle": 1.0},
                                                  balanced_sampler=True), 2, train=True)
    for select_on in ("kaggle", "mean_sources"):
        with pytest.raises(ConfigError, match=rf"train.select_on={select_on} needs val images of \['kaggle'\]"):
            check_selection(load_config("demo.yaml", [f"train.select_on={select_on}"]), data)
    check_selection(load_config("demo.yaml", ["train.select_on=rsna"]), data)

"""The cached Dataset: item format, normalization, boxes under augmentation, seeding, sampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pylon.data.cache import build_cache
from pylon.data.dataset import (
    CxrDataset,
    balanced_sampler,
    collate,
    make_loader,
    pos_weight_from_prevalence,
    prevalence,
)
from pylon.data.records import Record
from pylon.data.transforms import REFERENCE_MEAN, REFERENCE_STD, eval_transform, reseed, train_transform

SIZE = 64
DARK, BRIGHT = 20, 250


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
            boxes = (box,)
        path = folder / f"img{i}.png"
        Image.fromarray(array).save(path)
        records.append(Record(id=f"img{i}", patient_id=f"p{i}", source="rsna" if i < 4 else "kaggle",
                              path=str(path), label=i % 2, boxes=boxes, split="train"))
    return build_cache(records, folder / "cache", image_size=SIZE, resize="stretch", workers=1, progress=False)


def test_items_have_the_documented_shapes_and_types(cache):
    dataset = CxrDataset(cache, rows=[0, 1, 5], transform=eval_transform(SIZE))
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
    dataset = CxrDataset(cache, transform=eval_transform(SIZE, mean=0.3, std=0.2))
    expected = (cache.image(2).astype(np.float32) / 255.0 - 0.3) / 0.2
    first, second = dataset[2]["image"], dataset[2]["image"]
    np.testing.assert_allclose(first[0].numpy(), expected, atol=1e-5)
    assert torch.equal(first, second)
    default = CxrDataset(cache)[2]["image"]  # reference statistics by default
    np.testing.assert_allclose(default[0].numpy(),
                               (cache.image(2) / 255.0 - REFERENCE_MEAN) / REFERENCE_STD, atol=1e-5)


def test_train_augmentation_moves_boxes_with_the_image(cache):
    # Geometry only (rotation, crop, flip always on) so bright pixels mark the square exactly.
    transform = train_transform(SIZE, p_rotate=1.0, rotate_limit=45, hflip=0.5, brightness=0, contrast=0,
                                min_visibility=0.5)
    dataset = CxrDataset(cache, rows=[1, 3, 5, 7], transform=transform)
    reseed(transform, 0)
    bright_level = (0.5 - REFERENCE_MEAN) / REFERENCE_STD
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
    transform = train_transform(SIZE)
    reseed(transform, 1)
    dataset = CxrDataset(cache, rows=[0], transform=transform)
    images = [dataset[0]["image"] for _ in range(6)]
    assert all(im.shape == (1, SIZE, SIZE) and im.dtype == torch.float32 for im in images)
    assert len({im.numpy().tobytes() for im in images}) > 1


def _epoch(loader) -> tuple[list[str], torch.Tensor]:
    ids, images = [], []
    for batch in loader:
        ids += batch["id"]
        images.append(batch["image"])
    return ids, torch.cat(images)


def test_loaders_with_two_workers_are_reproducible_and_workers_differ(cache):
    dataset = CxrDataset(cache, transform=train_transform(SIZE))
    ids_a, images_a = _epoch(make_loader(dataset, batch_size=2, shuffle=True, workers=2, seed=7))
    ids_b, images_b = _epoch(make_loader(dataset, batch_size=2, shuffle=True, workers=2, seed=7))
    assert ids_a == ids_b and torch.equal(images_a, images_b)
    assert images_a.shape == (8, 1, SIZE, SIZE) and sorted(ids_a) == [f"img{i}" for i in range(8)]
    _, images_c = _epoch(make_loader(dataset, batch_size=2, shuffle=True, workers=2, seed=8))
    assert not torch.equal(images_a, images_c)

    # The same row in both workers must not get the same augmentation (forked generators).
    same_row = CxrDataset(cache, rows=[0] * 4, transform=train_transform(SIZE))
    _, images = _epoch(make_loader(same_row, batch_size=1, workers=2, seed=3))
    assert not torch.equal(images[0], images[1])  # batches 0 and 1 come from different workers


def test_balanced_sampler_draws_both_classes_equally():
    labels = np.array([1] * 10 + [0] * 90)
    drawn = np.array(list(balanced_sampler(labels, seed=0, num_samples=4000)))
    share = labels[drawn].mean()
    assert 0.46 < share < 0.54
    again = np.array(list(balanced_sampler(labels, seed=0, num_samples=4000)))
    assert np.array_equal(drawn, again)
    with pytest.raises(ValueError, match="both classes"):
        balanced_sampler([0, 0, 0], seed=0)


def test_prevalence_and_pos_weight(cache):
    assert prevalence([0, 0, 1, 1, 1]) == pytest.approx(0.6)
    assert prevalence(cache.records) == pytest.approx(0.5)
    assert pos_weight_from_prevalence(0.25) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        pos_weight_from_prevalence(0.0)
    with pytest.raises(ValueError, match="0 or 1"):
        prevalence([0, 2])

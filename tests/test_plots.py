"""pylon.plots: every figure is written as a real PNG; overlays put colour where the heat is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pylon.plots import (
    BOX_COLOUR,
    OverlayRow,
    overlay,
    plot_calibration,
    plot_confusion,
    plot_failure_gallery,
    plot_learning_curves,
    plot_overlay_grid,
    plot_pr,
    plot_roc,
)


def assert_png(path: Path, min_size: tuple = (200, 200)) -> None:
    assert path.is_file() and path.stat().st_size > 2000
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank canvas


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.4 * y + 0.6 * rng.random(200), 0, 1)
    return y, p


def test_curves_confusion_and_calibration_write_pngs(tmp_path, scores, phantom):
    y, p = scores
    groups = {"all": (y, p), "kaggle": (y[:100], p[:100]), "only negatives": (np.zeros(5), p[:5])}
    assert_png(plot_roc(groups, tmp_path / "roc.png"))
    assert_png(plot_pr(groups, tmp_path / "pr.png"))
    assert_png(plot_confusion(y, p >= 0.5, tmp_path / "sub" / "confusion.png"))
    assert_png(plot_calibration(y, p, tmp_path / "calibration.png"))


def test_curve_inputs_are_validated(tmp_path, scores):
    y, p = scores
    with pytest.raises(ValueError, match="no curves"):
        plot_roc({}, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        plot_confusion(y + 1, p >= 0.5, tmp_path / "c.png")


def test_learning_curves_from_csv_and_dataframe(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_loss": [0.7, 0.5, 0.4, 0.35],
            "val_loss": [0.65, 0.5, 0.45, 0.47],
            "val_auroc": [0.6, 0.75, 0.8, 0.81],
            "lr": [1e-4, 1e-4, 2e-5, 2e-5],
        }
    )
    csv = tmp_path / "history.csv"
    history.to_csv(csv, index=False)
    assert_png(plot_learning_curves(csv, tmp_path / "curves.png"), min_size=(800, 200))
    # Missing columns leave a labelled empty panel instead of failing.
    assert_png(plot_learning_curves(history[["epoch", "train_loss"]], tmp_path / "partial.png"))
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        plot_learning_curves(tmp_path / "nothing.csv", tmp_path / "x.png")


def hot_corner_map(size: int = 8) -> np.ndarray:
    heat = np.zeros((size, size), dtype=np.float32)
    heat[: size // 4, : size // 4] = 1.0  # hot top-left sixteenth
    return heat


def test_overlay_colours_only_where_the_heatmap_is_hot(phantom):
    image = phantom(64, 64)
    out = overlay(image, hot_corner_map(8), boxes=None)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    grey = np.repeat(image[..., None], 3, axis=2)
    diff = np.abs(out.astype(int) - grey.astype(int)).sum(axis=2)
    assert diff[:12, :12].min() > 30  # hot: colour-mapped
    np.testing.assert_array_equal(out[32:, 32:], grey[32:, 32:])  # cold: the plain image
    # A colder map changes the image less.
    weaker = overlay(image, 0.3 * hot_corner_map(8))
    assert np.abs(weaker.astype(int) - grey.astype(int)).sum() < diff.sum()


def test_overlay_draws_boxes_and_the_point(phantom):
    image = phantom(64, 64)
    out = overlay(image, np.zeros((4, 4)), boxes=[(10, 20, 30, 15)], point=(50.5, 50.5))
    # The box covers pixel columns 10..39 and rows 20..34; its outline is drawn there.
    assert tuple(out[20, 25]) == BOX_COLOUR and tuple(out[34, 25]) == BOX_COLOUR
    assert tuple(out[27, 10]) == BOX_COLOUR and tuple(out[27, 39]) == BOX_COLOUR
    assert tuple(out[27, 25]) != BOX_COLOUR  # inside is not filled
    assert tuple(out[50, 50]) == (255, 255, 255)  # the cross at the point


def test_overlay_accepts_float_and_channel_first_images(phantom):
    image = phantom(32, 48).astype(np.float32) / 255.0
    a = overlay(image, np.zeros((2, 3)))
    b = overlay(torch.from_numpy(image)[None], torch.zeros(1, 2, 3))
    assert a.shape == (32, 48, 3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="heatmap must be 2-D"):
        overlay(image, np.zeros((2, 2, 3)))


def test_overlay_grid_and_failure_gallery(tmp_path, phantom):
    image = phantom(64, 64)
    maps = {"pylon": hot_corner_map(16), "center": np.ones((64, 64)), "gradcam": hot_corner_map(64)}
    rows = [
        (image, maps, [(0, 0, 20, 20)], {"pylon": (5.5, 5.5), "center": (31.5, 31.5)}),
        OverlayRow(image, {"pylon": hot_corner_map(16)}, [], {}, title="no boxes", hits={"pylon": False}),
    ]
    path = plot_overlay_grid(rows, tmp_path / "grid.png", title="methods")
    assert_png(path)
    with Image.open(path) as img:
        assert img.width > 1.5 * img.height  # 4 columns by 2 rows

    n = 6
    hits = [True, False, False, True, False, True]
    gallery = plot_failure_gallery(
        [image] * n, [hot_corner_map(8)] * n, [[(40, 40, 10, 10)]] * n, [(4.5, 4.5)] * n, hits,
        tmp_path / "failures.png", captions=[f"img{i}" for i in range(n)],
    )
    assert_png(gallery)
    none = plot_failure_gallery([image], [hot_corner_map(8)], [[]], [None], [True], tmp_path / "none.png")
    assert none.is_file() and none.stat().st_size > 0
    with pytest.raises(ValueError, match="equal lengths"):
        plot_failure_gallery([image], [], [], [], [], tmp_path / "bad.png")

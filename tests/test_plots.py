"""pylon.plots: every figure is written as a real PNG of its size; overlays put colour where the heat is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pylon.plots import (
    BOX_COLOUR,
    GalleryImage,
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


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """A PNG of ``size`` pixels (figure inches x 120 dpi) with something drawn on it."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size
        assert np.asarray(img.convert("L")).std() > 5


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    return y, np.clip(0.4 * y + 0.6 * rng.random(200), 0, 1)


def test_curves_confusion_and_calibration_write_pngs(tmp_path, scores):
    y, p = scores
    groups = {"all": (y, p), "kaggle": (y[:100], p[:100]), "only negatives": (np.zeros(5), p[:5])}
    assert_png(plot_roc(groups, tmp_path / "roc.png"), (624, 600))
    assert_png(plot_pr(groups, tmp_path / "pr.png"), (624, 600))
    assert_png(plot_confusion(y, (p >= 0.5).astype(int), tmp_path / "sub" / "confusion.png"), (552, 480))
    assert_png(plot_calibration(y, p, tmp_path / "calibration.png"), (600, 720))


def test_learning_curves(tmp_path):
    history = pd.DataFrame({
        "epoch": [1, 2, 3, 4], "train_loss": [0.7, 0.5, 0.4, 0.35], "val_loss": [0.65, 0.5, 0.45, 0.47],
        "val_auroc": [0.6, 0.75, 0.8, 0.81], "lr": [1e-4, 1e-4, 2e-5, 2e-5],
    })
    history.to_csv(tmp_path / "history.csv", index=False)
    assert_png(plot_learning_curves(tmp_path / "history.csv", tmp_path / "curves.png"), (1440, 432))
    # Missing columns leave a labelled empty panel instead of failing.
    history[["epoch", "train_loss"]].to_csv(tmp_path / "partial.csv", index=False)
    assert_png(plot_learning_curves(tmp_path / "partial.csv", tmp_path / "partial.png"), (1440, 432))
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        plot_learning_curves(tmp_path / "nothing.csv", tmp_path / "x.png")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: not a readable CSV"):
        plot_learning_curves(tmp_path / "empty.csv", tmp_path / "x.png")
    (tmp_path / "header.csv").write_text("epoch,train_loss\n")
    with pytest.raises(ValueError, match="header.csv: the training history has no rows"):
        plot_learning_curves(tmp_path / "header.csv", tmp_path / "x.png")


def hot_corner_map(size: int = 8) -> np.ndarray:
    heat = np.zeros((size, size), dtype=np.float32)
    heat[: size // 4, : size // 4] = 1.0  # hot top-left sixteenth
    return heat


def test_overlay_colours_only_where_the_heatmap_is_hot(phantom):
    image = phantom(64, 64)
    out = overlay(image, hot_corner_map(8))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    grey = np.repeat(image[..., None], 3, axis=2)
    diff = np.abs(out.astype(int) - grey.astype(int)).sum(axis=2)
    assert diff[:12, :12].min() > 30  # hot: colour-mapped
    np.testing.assert_array_equal(out[32:, 32:], grey[32:, 32:])  # cold: the plain image
    # A colder map changes the image less; heat outside [0, 1] is clipped.
    weaker = overlay(image, 0.3 * hot_corner_map(8))
    assert np.abs(weaker.astype(int) - grey.astype(int)).sum() < diff.sum()
    full = hot_corner_map(64)
    np.testing.assert_array_equal(overlay(image, 3.0 * full - 1.0), overlay(image, full))
    # Torch maps, (1, h, w) maps and RGB images give the same picture.
    np.testing.assert_array_equal(overlay(grey, torch.from_numpy(hot_corner_map(8))[None]), out)


def test_overlay_draws_boxes_and_the_point(phantom):
    image = phantom(64, 64)
    out = overlay(image, np.zeros((4, 4)), boxes=[(10, 20, 30, 15)], point=(50.5, 50.5))
    # The box covers pixel columns 10..39 and rows 20..34; its outline is drawn there.
    assert tuple(out[20, 25]) == BOX_COLOUR and tuple(out[34, 25]) == BOX_COLOUR
    assert tuple(out[27, 10]) == BOX_COLOUR and tuple(out[27, 39]) == BOX_COLOUR
    assert tuple(out[27, 25]) != BOX_COLOUR  # inside is not filled
    assert tuple(out[19, 25]) != BOX_COLOUR and tuple(out[35, 25]) != BOX_COLOUR
    assert tuple(out[50, 50]) == (255, 255, 255)  # the cross at the point, outlined in black
    assert tuple(out[50, 45]) == (0, 0, 0) or tuple(out[50, 46]) == (0, 0, 0)
    # A missing or nan point draws nothing.
    plain = overlay(image, np.zeros((4, 4)))
    np.testing.assert_array_equal(overlay(image, np.zeros((4, 4)), point=(np.nan, 3.0)), plain)


def test_overlay_grid_and_failure_gallery(tmp_path, phantom):
    image = phantom(64, 64)
    rows = [
        OverlayRow(image, {"pylon": hot_corner_map(16), "center": np.ones((64, 64)), "gradcam": hot_corner_map(64)},
                   [(0, 0, 20, 20)], {"pylon": (5.5, 5.5), "center": (31.5, 31.5)}, hits={"pylon": True}),
        OverlayRow(image, {"pylon": hot_corner_map(16)}, title="no boxes", hits={"pylon": False}),
    ]
    assert_png(plot_overlay_grid(rows, tmp_path / "grid.png", title="methods"), (1248, 672))  # 4 x 2 cells

    gallery = plot_failure_gallery([GalleryImage(image, hot_corner_map(8), [(40, 40, 10, 10)], (4.5, 4.5), c) for c in "abc"],
                                   tmp_path / "failures.png", n_failures=3, n_images=6)
    assert_png(gallery, (1008, 396))  # three misses in one row
    many = plot_failure_gallery([GalleryImage(image, hot_corner_map(8), [], None)] * 5, tmp_path / "many.png",
                                n_failures=20, n_images=30, title="misses")
    assert_png(many, (1344, 744))  # 5 of 20, in rows of 4
    none = plot_failure_gallery([], tmp_path / "none.png", n_failures=0, n_images=4)
    with Image.open(none) as img:
        assert img.size == (480, 180)

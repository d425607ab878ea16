"""pylon.metrics: hand-computed localization and classification cases, cross-checked
against scikit-learn / OpenCV where an independent implementation exists."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from pylon.metrics import (
    argmax_points,
    auroc_rows,
    bootstrap_ci,
    box_mask,
    by_group,
    calibration_bins,
    classification_metrics,
    energy_in_box,
    expected_calibration_error,
    jsonable,
    laterality_hits,
    mean_rows,
    point_accuracy,
    pointing_game,
    youden_threshold,
)


def peak_map(height: int, width: int, row: int, col: int) -> np.ndarray:
    heat = np.zeros((height, width), dtype=np.float32)
    heat[row, col] = 1.0
    return heat


# ---------------------------------------------------------------------------- point accuracy


def test_box_mask_is_the_rasterised_mask_for_integer_boxes_and_pixel_centres_otherwise():
    expected = np.zeros((6, 8), dtype=bool)
    expected[1:4, 2:7] = True
    expected[5:6, 0:1] = True
    np.testing.assert_array_equal(box_mask([(2, 1, 5, 3), (0, 5, 1, 1)], (6, 8)), expected)
    # A box from 1.6 to 2.4 holds no pixel centre; one from 2.2 to 2.7 holds column/row 2's.
    assert not box_mask([(1.6, 1.6, 0.8, 0.8)], (4, 4)).any()
    assert np.argwhere(box_mask([(2.2, 2.2, 0.5, 0.5)], (4, 4))).tolist() == [[2, 2]]
    assert not box_mask([], (4, 4)).any()


def test_point_is_the_pixel_centre_and_box_edges_are_inclusive():
    # The peak at row 1, column 2 stands for the point (x, y) = (2.5, 1.5).
    maps = np.stack([peak_map(4, 4, 1, 2)] * 5)
    boxes = [
        [(2.5, 1.5, 1.0, 1.0)],  # point is this box's top-left corner
        [(0.0, 0.0, 2.5, 1.5)],  # ... this box's bottom-right corner
        [(2.6, 1.5, 1.0, 1.0)],  # 0.1 px to the right of the point
        [(2.0, 1.0, 1.0, 1.0)],  # integer box of exactly that pixel
        [(3.0, 0.0, 1.0, 4.0)],  # integer box of the next column
    ]
    result = point_accuracy(maps, boxes, image_size=(4, 4))
    np.testing.assert_array_equal(result.points, np.tile([2.5, 1.5], (5, 1)))
    np.testing.assert_array_equal(result.hits, [True, True, False, True, False])
    assert result.n == 5
    assert result.accuracy == pytest.approx(3 / 5)


def test_any_of_several_boxes_counts_and_images_without_boxes_are_skipped():
    maps = np.stack([peak_map(4, 4, 1, 2), peak_map(4, 4, 3, 3), peak_map(4, 4, 0, 0), peak_map(4, 4, 0, 0)])
    boxes = [
        [(0, 0, 1, 1), (2, 1, 1, 1)],  # second box holds (2.5, 1.5)
        [],  # no boxes: not counted
        None,  # no boxes: not counted
        [(1, 1, 2, 2), (3, 3, 1, 1)],  # (0.5, 0.5) is in neither
    ]
    result = point_accuracy(torch.from_numpy(maps), boxes, image_size=(4, 4))
    assert result.n == 2
    np.testing.assert_array_equal(result.indices, [0, 3])
    np.testing.assert_array_equal(result.hits, [True, False])
    assert result.accuracy == pytest.approx(0.5)
    assert result.as_dict() == {"accuracy": 0.5, "n": 2}


def test_no_image_with_boxes_gives_n_zero_and_nan_accuracy():
    result = point_accuracy(np.zeros((3, 4, 4)), [[], None, []], image_size=(8, 8))
    assert result.n == 0 and math.isnan(result.accuracy)
    assert result.as_dict() == {"accuracy": None, "n": 0}


def test_heatmap_is_upsampled_bilinearly_to_the_box_frame():
    # 2x2 map with its maximum bottom-right, upsampled to 8x8 (align_corners=False): output
    # pixel i samples source coordinate (i + 0.5) / 4 - 0.5, clamped to the border, so
    # rows/columns 6 and 7 all read the maximum and the first of them is pixel (6, 6).
    heat = np.array([[[0.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    np.testing.assert_array_equal(argmax_points(heat, (8, 8)), [[6.5, 6.5]])
    assert point_accuracy(heat, [[(6, 6, 2, 2)]], image_size=(8, 8)).hits.tolist() == [True]
    assert point_accuracy(heat, [[(0, 0, 6.4, 8)]], image_size=(8, 8)).hits.tolist() == [False]
    # A centred peak of a 3x3 map upsampled 4x lands between pixels 5 and 6: two equal
    # samples per axis, and the first maximum is (5, 5).
    centred = peak_map(3, 3, 1, 1)[None]
    np.testing.assert_array_equal(argmax_points(centred, (12, 12)), [[5.5, 5.5]])
    # Non-square target: x follows the width, y the height.
    np.testing.assert_array_equal(argmax_points(heat, (4, 8)), [[6.5, 3.5]])


def test_upsampling_matches_opencv_half_pixel_bilinear():
    rng = np.random.default_rng(3)
    maps = rng.random((20, 7, 9)).astype(np.float32)
    ours = argmax_points(maps, (56, 45))
    for heat, point in zip(maps, ours):
        big = cv2.resize(heat, (45, 56), interpolation=cv2.INTER_LINEAR)
        row, col = np.unravel_index(np.argmax(big), big.shape)
        np.testing.assert_array_equal(point, [col + 0.5, row + 0.5])


def test_ties_resolve_to_the_first_maximum_in_row_major_order():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[2, 1] = heat[0, 3] = heat[3, 0] = 5.0
    np.testing.assert_array_equal(argmax_points(heat[None], (4, 4)), [[3.5, 0.5]])
    result = point_accuracy(np.stack([heat, heat]), [[(3, 0, 1, 1)], [(1, 2, 1, 1)]], image_size=(4, 4))
    np.testing.assert_array_equal(result.hits, [True, False])


def test_point_accuracy_tolerance():
    maps = np.stack([peak_map(16, 16, 1, 2)] * 2)  # point (2.5, 1.5)
    boxes = [[(5.5, 0, 1, 4)], [(5.5, 5.5, 2, 2)]]  # 3 px right; (3, 4) -> 5 px diagonally
    assert point_accuracy(maps, boxes, (16, 16), tolerance=2.9).hits.tolist() == [False, False]
    assert point_accuracy(maps, boxes, (16, 16), tolerance=3.0).hits.tolist() == [True, False]
    assert point_accuracy(maps, boxes, (16, 16), tolerance=4.99).hits.tolist() == [True, False]
    assert point_accuracy(maps, boxes, (16, 16), tolerance=5.0).hits.tolist() == [True, True]


def test_pointing_game_15px_tolerance():
    points = np.array([[100.0, 100.0]] * 4)
    boxes = [
        [(114.9, 50, 40, 100)],  # 14.9 px to the right
        [(115.1, 50, 40, 100)],  # 15.1 px to the right
        [(200, 200, 10, 10), (50, 114.9, 100, 10)],  # second box 14.9 px below
        [(100 + 10.6, 100 + 10.6, 5, 5)],  # corner at 10.6 * sqrt(2) = 14.99 px
    ]
    result = pointing_game(points, boxes, tolerance=15.0)
    np.testing.assert_array_equal(result.hits, [True, False, True, True])
    assert pointing_game(points[3:], boxes[3:], tolerance=14.9).hits.tolist() == [False]
    # Inside a box the distance is zero, whatever the tolerance.
    assert pointing_game([[5.0, 5.0]], [[(0, 0, 10, 10)]], tolerance=0).hits.tolist() == [True]


def test_point_accuracy_is_argmax_plus_pointing_game():
    rng = np.random.default_rng(0)
    maps = rng.random((50, 8, 8)).astype(np.float32)
    boxes = [[tuple(rng.uniform(0, 24, 2)) + tuple(rng.uniform(1, 12, 2))] if i % 3 else [] for i in range(50)]
    direct = point_accuracy(maps, boxes, (32, 32), tolerance=2.0)
    composed = pointing_game(argmax_points(maps, (32, 32)), boxes, tolerance=2.0)
    np.testing.assert_array_equal(direct.hits, composed.hits)
    np.testing.assert_array_equal(direct.indices, composed.indices)
    np.testing.assert_array_equal(direct.points, composed.points)


@pytest.mark.parametrize(
    "maps, boxes, match",
    [
        (np.zeros((2, 1, 4, 4)), [[], []], r"\(N, h, w\).*heatmap\[:, 0\]"),
        (np.zeros((2, 4, 4)), [[]], "boxes for 1 images but 2"),
        (np.zeros((1, 4, 4)), [(0, 0, 1, 1)], "image 0.*wrapped in a list"),
        (np.zeros((1, 4, 4)), [[(0, 0, -1, 1)]], "image 0.*negative width"),
        (np.full((1, 4, 4), np.nan), [[(0, 0, 1, 1)]], "heatmap 0 contains NaN"),
    ],
)
def test_point_accuracy_rejects_bad_input_clearly(maps, boxes, match):
    with pytest.raises(ValueError, match=match):
        point_accuracy(maps, boxes, image_size=(4, 4))


def test_point_accuracy_on_6000_maps_runs_chunked():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((6000, 64, 64), dtype=np.float32))
    boxes = [[(64, 64, 128, 128)] if i % 2 else [] for i in range(6000)]
    result = point_accuracy(maps, boxes, image_size=(256, 256))
    assert result.n == 3000 and result.hits.shape == (3000,) and result.points.shape == (3000, 2)
    for k in range(0, 3000, 300):  # spot-check chunked results against OpenCV
        big = cv2.resize(maps[result.indices[k]].numpy(), (256, 256), interpolation=cv2.INTER_LINEAR)
        row, col = np.unravel_index(np.argmax(big), big.shape)
        np.testing.assert_array_equal(result.points[k], [col + 0.5, row + 0.5])
        assert result.hits[k] == (64 <= col + 0.5 <= 192 and 64 <= row + 0.5 <= 192)


# ---------------------------------------------------------------------------- classification

LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 1])
PROBS = np.array([0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5, 0.8])


def test_classification_metrics_hand_computed():
    # Calls at 0.5: [1, 1, 0, 1, 0, 0, 1, 1] -> tp 3, fn 1, fp 2, tn 2.
    m = classification_metrics(LABELS, PROBS, threshold=0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(6 / 9)
    # 13 of the 16 (positive, negative) pairs are ordered correctly.
    assert m["auroc"] == pytest.approx(13 / 16)
    assert (m["n"], m["n_pos"]) == (8, 4)
    assert "note" not in m


def test_classification_metrics_agree_with_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    m = classification_metrics(y, torch.from_numpy(p), threshold=0.4)
    pred = p >= 0.4
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_one_class_present_gives_nan_auroc_with_a_note():
    m = classification_metrics([0, 0, 0], [0.2, 0.7, 0.1])
    assert math.isnan(m["auroc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(2 / 3)
    assert "only one class" in m["note"] and "no positive labels" in m["note"]
    assert json.loads(json.dumps(jsonable(m)))["auroc"] is None


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "labels must be 0 or 1"),
        ([0, 1], [0.1, 1.3], r"\[0, 1\].*sigmoid"),
        ([0, 1], [0.1], "differ in length"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([], [], "empty"),
    ],
)
def test_classification_metrics_reject_bad_input(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, probs)


def test_by_group_matches_metrics_on_each_subset_and_skips_missing_groups():
    groups = ["kaggle", "rsna", "rsna", None, "kaggle", "rsna", float("nan"), "kaggle"]
    out = by_group(LABELS, PROBS, groups)
    assert list(out) == ["kaggle", "rsna"]
    kaggle = np.array([0, 4, 7])
    assert out["kaggle"] == classification_metrics(LABELS[kaggle], PROBS[kaggle])
    assert out["rsna"]["n"] == 3
    assert list(by_group(LABELS, PROBS, groups, min_n=4)) == []


def test_youden_threshold():
    # Unique best: every positive above every negative except one.
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert youden_threshold(y, p) == pytest.approx(0.6)  # J = 3/4 + 4/4 - 1 = 0.75
    # LABELS/PROBS: J = 0.5 at 0.8, 0.6 and 0.4 -> the highest (most specific) wins.
    assert youden_threshold(LABELS, PROBS) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1], [0.3, 0.4])


def test_expected_calibration_error_hand_computed():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.85, 0.95])
    # bins (0, .1]: |0 - .05|, (.1, .2]: 2 samples |.5 - .15|, (.8, .9]: |1 - .85|, (.9, 1]: |1 - .95|
    expected = (0.05 + 2 * 0.35 + 0.15 + 0.05) / 5
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(expected)
    bins = calibration_bins(y, p, n_bins=10)
    assert bins.count.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 1, 1]
    assert math.isnan(bins.mean_prob[2])
    # Perfectly calibrated bins give zero.
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)
    estimate = roc_auc_score(y, p)
    low, high = bootstrap_ci(auroc_rows, y, p, n_boot=400, seed=7, vectorized=True)
    assert low < estimate < high and high - low < 0.2
    assert bootstrap_ci(auroc_rows, y, p, n_boot=400, seed=7, vectorized=True) == (low, high)
    assert bootstrap_ci(auroc_rows, y, p, n_boot=400, seed=8, vectorized=True) != (low, high)
    # The per-resample loop draws the same resamples as the vectorised path.
    loop = bootstrap_ci(roc_auc_score, y, p, n_boot=400, seed=7)
    assert loop == pytest.approx((low, high), abs=1e-12)


def test_bootstrap_ci_on_hit_vectors():
    hits = np.array([True] * 70 + [False] * 30)
    low, high = bootstrap_ci(mean_rows, hits, n_boot=2000, seed=0, vectorized=True)
    assert low < 0.7 < high
    # Normal approximation: 0.7 +- 1.96 * sqrt(0.21 / 100) = [0.61, 0.79].
    assert low == pytest.approx(0.61, abs=0.02) and high == pytest.approx(0.79, abs=0.02)
    assert bootstrap_ci(np.mean, hits, n_boot=2000, seed=0) == (low, high)


def test_auroc_rows_matches_sklearn_with_ties_and_flags_one_class_rows():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (5, 40))
    s = rng.integers(0, 5, (5, 40)).astype(float)  # many ties
    y[4] = 1
    got = auroc_rows(y, s)
    for row in range(4):
        assert got[row] == pytest.approx(roc_auc_score(y[row], s[row]))
    assert math.isnan(got[4])


# ---------------------------------------------------------------------------- energy, laterality


def test_energy_of_a_map_entirely_inside_the_box_is_one():
    heat = np.zeros((1, 16, 16))
    heat[0, 4:8, 2:10] = 3.0
    assert energy_in_box(heat, [[(2, 4, 8, 4)]], (16, 16))[0] == pytest.approx(1.0)


def test_constant_map_energy_is_the_box_area_share_whatever_its_offset():
    boxes = [[(0, 0, 16, 8), (0, 0, 4, 4)]]  # overlapping boxes count once: half the image
    for value in (0.0, 0.7, 5.0):
        assert energy_in_box(np.full((1, 4, 4), value), boxes, (16, 16))[0] == pytest.approx(0.5)


def test_energy_is_min_max_scaled_so_an_offset_carries_no_energy():
    heat = np.full((1, 8, 8), 10.0)
    heat[0, 0, 0] = 11.0  # only this pixel carries energy after scaling
    assert energy_in_box(heat, [[(0, 0, 1, 1)]], (8, 8))[0] == pytest.approx(1.0)
    assert energy_in_box(heat, [[(4, 4, 4, 4)]], (8, 8))[0] == pytest.approx(0.0)


def test_energy_upsamples_bilinearly_to_the_box_frame_and_skips_images_without_boxes():
    heat = np.zeros((2, 2, 2))
    heat[:, 0, 0] = 1.0  # top-left cell of a 2x2 map
    up = torch.nn.functional.interpolate(torch.tensor(heat[:1, None]), size=(8, 8), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    up = (up - up.min()) / (up.max() - up.min())
    shares = energy_in_box(heat, [[(0, 0, 4, 4)], []], (8, 8))
    assert shares[0] == pytest.approx(up[:4, :4].sum() / up.sum())
    assert math.isnan(shares[1])


def test_laterality_counts_one_sided_images_only():
    boxes = [
        [(0, 0, 10, 10), (20, 50, 20, 20)],  # both centres left of x=50
        [(60, 0, 10, 10)],  # right
        [(60, 0, 10, 10)],  # right, missed
        [(10, 0, 10, 10), (70, 0, 10, 10)],  # both sides: not counted
        [(45, 0, 10, 10)],  # centred on the midline: not counted
        [],  # no boxes
    ]
    points = [(30, 90), (99, 0), (10, 10), (10, 10), (10, 10), (10, 10)]
    hits = laterality_hits(points, boxes, width=100)
    np.testing.assert_array_equal(hits[:3], [1.0, 1.0, 0.0])
    assert np.isnan(hits[3:]).all()

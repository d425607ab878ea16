"""pylon.metrics: hand-computed localization and classification cases, cross-checked
against scikit-learn / OpenCV where an independent implementation exists."""
from __future__ import annotations

import json
import math
from functools import partial

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from pylon.metrics import (
    argmax_points,
    bootstrap_ci,
    box_mask,
    by_group,
    calibration_bins,
    classification_metrics,
    classification_rows,
    energy_in_box,
    expected_calibration_error,
    jsonable,
    laterality_hits,
    point_accuracy,
    pointing_game,
    youden_threshold,
)


def peak_map(height: int, width: int, row: int, col: int) -> np.ndarray:
    heat = np.zeros((height, width), dtype=np.float32)
    heat[row, col] = 1.0
    return heat


# ---------------------------------------------------------------------------- points and boxes


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
    points = argmax_points(np.stack([peak_map(4, 4, 1, 2)] * 5), (4, 4))
    np.testing.assert_array_equal(points, np.tile([2.5, 1.5], (5, 1)))
    boxes = [
        [(2.5, 1.5, 1.0, 1.0)],  # point is this box's top-left corner
        [(0.0, 0.0, 2.5, 1.5)],  # ... this box's bottom-right corner
        [(2.6, 1.5, 1.0, 1.0)],  # 0.1 px to the right of the point
        [(2.0, 1.0, 1.0, 1.0)],  # integer box of exactly that pixel
        [(3.0, 0.0, 1.0, 4.0)],  # integer box of the next column
    ]
    np.testing.assert_array_equal(pointing_game(points, boxes), [1, 1, 0, 1, 0])


def test_any_of_several_boxes_counts_and_images_without_boxes_are_nan():
    maps = np.stack([peak_map(4, 4, 1, 2), peak_map(4, 4, 3, 3), peak_map(4, 4, 0, 0), peak_map(4, 4, 0, 0)])
    boxes = [
        [(0, 0, 1, 1), (2, 1, 1, 1)],  # second box holds (2.5, 1.5)
        [],  # no boxes: not counted
        None,  # no boxes: not counted
        np.array([(1, 1, 2, 2), (3, 3, 1, 1)]),  # (0.5, 0.5) is in neither
    ]
    hits = pointing_game(argmax_points(torch.from_numpy(maps), (4, 4)), boxes)
    np.testing.assert_array_equal(hits, [1.0, np.nan, np.nan, 0.0])
    assert point_accuracy(maps, boxes, (4, 4)) == 0.5
    assert math.isnan(point_accuracy(maps, [[], None, [], []], (8, 8)))


def test_one_box_per_image_may_come_as_an_n_by_4_array():
    points = np.array([[2.5, 1.5], [2.5, 1.5]])
    np.testing.assert_array_equal(pointing_game(points, np.array([[2, 1, 1, 1], [3, 0, 1, 4]])), [1.0, 0.0])


def test_heatmap_is_upsampled_bilinearly_to_the_box_frame():
    # 2x2 map with its maximum bottom-right, upsampled to 8x8 (align_corners=False): output
    # pixel i samples source coordinate (i + 0.5) / 4 - 0.5, clamped to the border, so
    # rows/columns 6 and 7 all read the maximum and the first of them is pixel (6, 6).
    heat = np.array([[[0.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    np.testing.assert_array_equal(argmax_points(heat, (8, 8)), [[6.5, 6.5]])
    assert point_accuracy(heat, [[(6, 6, 2, 2)]], (8, 8)) == 1.0
    assert point_accuracy(heat, [[(0, 0, 6.4, 8)]], (8, 8)) == 0.0
    # A centred peak of a 3x3 map upsampled 4x lands between pixels 5 and 6: two equal
    # samples per axis, and the first maximum is (5, 5).
    np.testing.assert_array_equal(argmax_points(peak_map(3, 3, 1, 1)[None], (12, 12)), [[5.5, 5.5]])
    # Non-square target: x follows the width, y the height.
    np.testing.assert_array_equal(argmax_points(heat, (4, 8)), [[6.5, 3.5]])


def test_upsampling_matches_opencv_half_pixel_bilinear_across_chunks():
    rng = np.random.default_rng(3)
    maps = rng.random((20, 7, 9)).astype(np.float32)
    for size in ((56, 45), (1024, 1024)):  # 1024 px: chunks of 16 maps
        for heat, point in zip(maps, argmax_points(maps, size)):
            big = cv2.resize(heat, size[::-1], interpolation=cv2.INTER_LINEAR)
            row, col = np.unravel_index(np.argmax(big), big.shape)
            np.testing.assert_array_equal(point, [col + 0.5, row + 0.5])


def test_ties_resolve_to_the_first_maximum_in_row_major_order():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[2, 1] = heat[0, 3] = heat[3, 0] = 5.0
    np.testing.assert_array_equal(argmax_points(heat[None], (4, 4)), [[3.5, 0.5]])


def test_pointing_game_tolerance():
    points = np.array([[2.5, 1.5]] * 2)
    boxes = [[(5.5, 0, 1, 4)], [(5.5, 5.5, 2, 2)]]  # 3 px right; (3, 4) -> 5 px diagonally
    assert pointing_game(points, boxes, tolerance=2.9).tolist() == [0, 0]
    assert pointing_game(points, boxes, tolerance=3.0).tolist() == [1, 0]
    assert pointing_game(points, boxes, tolerance=4.99).tolist() == [1, 0]
    assert pointing_game(points, boxes, tolerance=5.0).tolist() == [1, 1]


def test_pointing_game_15px_tolerance():
    points = np.array([[100.0, 100.0]] * 4)
    boxes = [
        [(114.9, 50, 40, 100)],  # 14.9 px to the right
        [(115.1, 50, 40, 100)],  # 15.1 px to the right
        [(200, 200, 10, 10), (50, 114.9, 100, 10)],  # second box 14.9 px below
        [(100 + 10.6, 100 + 10.6, 5, 5)],  # corner at 10.6 * sqrt(2) = 14.99 px
    ]
    assert pointing_game(points, boxes, tolerance=15.0).tolist() == [1, 0, 1, 1]
    assert pointing_game(points[3:], boxes[3:], tolerance=14.9).tolist() == [0]
    # Inside a box the distance is zero, whatever the tolerance.
    assert pointing_game([[5.0, 5.0]], [[(0, 0, 10, 10)]]).tolist() == [1]


def test_scaling_points_and_boxes_maps_one_frame_onto_another():
    # Integer boxes that start at the peak pixel's column (hit) or the next one (miss, 0.5 px
    # away) keep those outcomes in a 4x larger frame: pixel centres scale with the boxes.
    rng = np.random.default_rng(0)
    points = argmax_points(rng.random((40, 16, 16)).astype(np.float32), (64, 64))
    cols, rows = np.floor(points).astype(int).T
    boxes = [[(c + i % 2, r, 3, 2)] for i, (c, r) in enumerate(zip(cols, rows))]
    small = pointing_game(points, boxes)
    np.testing.assert_array_equal(small, [1.0, 0.0] * 20)
    np.testing.assert_array_equal(pointing_game(points * 4, [[tuple(4 * v for v in b[0])] for b in boxes]), small)


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
    heat = np.zeros((3, 2, 2))
    heat[:, 0, 0] = 1.0  # top-left cell of a 2x2 map
    up = torch.nn.functional.interpolate(torch.tensor(heat[:1, None]), size=(8, 8), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    up = (up - up.min()) / (up.max() - up.min())
    shares = energy_in_box(heat, [[(0, 0, 4, 4)], [], None], (8, 8))
    assert shares[0] == pytest.approx(up[:4, :4].sum() / up.sum())
    assert np.isnan(shares[1:]).all()


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


def test_a_constant_map_has_no_peak_and_hits_nothing():
    """An all-zero Grad-CAM's first maximum would be the top-left pixel: a left-side "hit"."""
    maps = np.zeros((2, 8, 8))
    maps[1, 5, 6] = 1.0
    points = argmax_points(maps, (64, 64))
    assert np.isnan(points[0]).all() and np.abs(points[1] - (52, 44)).max() <= 1  # the peak pixel's centre
    left_box = [[(0, 0, 20, 20)], [(40, 30, 20, 20)]]
    np.testing.assert_array_equal(pointing_game(points, left_box, tolerance=100.0), [0.0, 1.0])
    np.testing.assert_array_equal(laterality_hits(points, left_box, width=64), [0.0, 1.0])


# ---------------------------------------------------------------------------- classification

LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 1])
PROBS = np.array([0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5, 0.8])


def test_classification_metrics_hand_computed():
    # Calls at 0.5: [1, 1, 0, 1, 0, 0, 1, 1] -> tp 3, fn 1, fp 2, tn 2.
    m = classification_metrics(LABELS, PROBS, threshold=0.5)
    assert list(m) == ["auroc", "accuracy", "sensitivity", "specificity", "precision", "f1",
                       "n", "n_pos", "tp", "fp", "tn", "fn", "threshold"]
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == 5 / 8 and m["sensitivity"] == 3 / 4 and m["specificity"] == 2 / 4
    assert m["precision"] == 3 / 5 and m["f1"] == 6 / 9
    assert m["auroc"] == pytest.approx(13 / 16)  # 13 of the 16 (positive, negative) pairs ordered
    assert (m["n"], m["n_pos"], m["threshold"]) == (8, 4, 0.5)
    assert all(type(m[k]) is int for k in ("n", "n_pos", "tp", "fp", "tn", "fn"))


def test_classification_metrics_agree_with_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    m = classification_metrics(torch.from_numpy(y).float(), torch.from_numpy(p), threshold=0.4)
    pred = p >= 0.4
    assert m["auroc"] == roc_auc_score(y, p)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_undefined_metrics_are_nan_with_a_note():
    m = classification_metrics([0, 0, 0], [0.2, 0.7, 0.1])
    assert math.isnan(m["auroc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(2 / 3)
    assert "only one class" in m["note"] and "no positive labels" in m["note"]
    assert json.loads(json.dumps(jsonable(m)))["auroc"] is None
    m = classification_metrics([1, 0, 1], [0.2, 0.3, 0.1])
    assert math.isnan(m["precision"]) and m["f1"] == 0.0
    assert m["note"] == "precision undefined: nothing was predicted positive"
    m = classification_metrics([1, 1], [0.6, 0.2])
    assert math.isnan(m["specificity"]) and "no negative labels" in m["note"]


@pytest.mark.parametrize("labels, probs", [([0, 1, 2], [0.1, 0.2, 0.3]), ([0, 1], [0.1])])
def test_classification_metrics_reject_labels_other_than_one_per_prob_in_0_1(labels, probs):
    with pytest.raises(AssertionError, match="labels"):
        classification_metrics(labels, probs)


def test_by_group_applies_fn_to_each_group_and_skips_missing_groups():
    groups = ["rsna", "kaggle", "rsna", None, "kaggle", "rsna", "", "kaggle"]
    out = by_group(classification_metrics, groups, LABELS, PROBS)
    assert list(out) == ["kaggle", "rsna"]
    kaggle = np.array([1, 4, 7])
    assert out["kaggle"] == classification_metrics(LABELS[kaggle], PROBS[kaggle])
    assert out["rsna"]["n"] == 3
    assert by_group(lambda hits: hits.sum(), groups, np.arange(8)) == {"kaggle": 12, "rsna": 7}


def test_youden_threshold():
    # Unique best: every positive above every negative except one.
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert youden_threshold(y, p) == pytest.approx(0.6)  # J = 3/4 + 4/4 - 1 = 0.75
    # LABELS/PROBS: J = 0.5 at 0.8, 0.6 and 0.4 -> the highest (most specific) wins.
    assert youden_threshold(LABELS, PROBS) == pytest.approx(0.8)
    with pytest.raises(AssertionError, match="both classes"):
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
    # 0 falls in the first bin, 0.1 (a right edge) in the first too.
    assert calibration_bins([0, 1], [0.0, 0.1], n_bins=10).count.tolist() == [2] + [0] * 9
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)


def test_jsonable():
    value = {"a": np.float32(0.5), "b": np.arange(3), 1: [np.nan, np.inf, np.bool_(True)], "t": torch.tensor([1.5])}
    assert jsonable(value) == {"a": 0.5, "b": [0, 1, 2], "1": [None, None, True], "t": [1.5]}


# ---------------------------------------------------------------------------- bootstrap


def scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1), 2)  # rounded: many ties


def test_bootstrap_ci_equals_a_per_resample_loop_over_classification_metrics():
    y, p = scores(60, 2)
    ci = bootstrap_ci(partial(classification_rows, threshold=0.4), y, p, n_boot=100, seed=7)
    index = np.random.default_rng(7).integers(0, 60, size=(100, 60))
    loop = [classification_metrics(y[i], p[i], 0.4) for i in index]
    assert list(ci) == ["auroc", "accuracy", "sensitivity", "specificity", "precision", "f1"]
    for name, bounds in ci.items():
        values = np.array([m[name] for m in loop])
        expected = np.quantile(values[np.isfinite(values)], [0.025, 0.975]).tolist()
        if name == "auroc":  # by ranks: roc_auc_score up to rounding
            assert bounds == pytest.approx(expected, abs=1e-12)
        else:
            assert bounds == expected, name


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    y, p = scores(300, 2)
    auroc = partial(classification_rows, threshold=0.5)
    low, high = bootstrap_ci(auroc, y, p, n_boot=400, seed=7)["auroc"]
    assert low < roc_auc_score(y, p) < high and high - low < 0.2
    assert bootstrap_ci(auroc, y, p, n_boot=400, seed=7)["auroc"] == [low, high]
    assert bootstrap_ci(auroc, y, p, n_boot=400, seed=8)["auroc"] != [low, high]
    assert list(bootstrap_ci(partial(classification_rows, auroc=False), y, p, n_boot=10)) == [
        "accuracy", "sensitivity", "specificity", "precision", "f1"]


def test_bootstrap_ci_on_hit_vectors_matches_the_normal_approximation():
    hits = np.array([1.0] * 70 + [0.0] * 30)
    low, high = bootstrap_ci(lambda h: {"hit": h.mean(-1)}, hits, n_boot=2000, seed=0)["hit"]
    # 0.7 +- 1.96 * sqrt(0.21 / 100) = [0.61, 0.79].
    assert low == pytest.approx(0.61, abs=0.02) and high == pytest.approx(0.79, abs=0.02)


def test_bootstrap_resamples_are_one_draw_of_shape_n_boot_by_n_even_when_drawn_in_blocks():
    hits = (np.random.default_rng(1).random(5000) < 0.3).astype(np.float64)
    got = bootstrap_ci(lambda h: {"hit": h.mean(-1)}, hits, n_boot=1000, seed=3)["hit"]  # 5M indices: 2 blocks
    index = np.random.default_rng(3).integers(0, 5000, size=(1000, 5000))
    assert got == np.quantile(hits[index].mean(-1), [0.025, 0.975]).tolist()


def test_bootstrap_drops_nan_resamples_per_name():
    # One positive, ranked first and called positive: about a third of the resamples miss it
    # (sensitivity and AUROC undefined there); those are dropped, the rest give 1.
    y, p = np.array([1] + [0] * 9), np.array([0.9] + [0.1, 0.2, 0.3, 0.4] * 2 + [0.1])
    ci = bootstrap_ci(partial(classification_rows, threshold=0.5), y, p, n_boot=200)
    assert ci["sensitivity"] == ci["auroc"] == ci["specificity"] == [1.0, 1.0]
    assert ci["precision"] == [1.0, 1.0]
    ci = bootstrap_ci(lambda h: {"never": np.full(len(h), np.nan)}, np.ones(5), n_boot=10)
    assert all(math.isnan(v) for v in ci["never"])


def test_bootstrap_statistic_must_give_one_value_per_resample():
    # A per-resample statistic (one scalar for the whole block) would give a silently wrong interval.
    with pytest.raises(AssertionError, match="one value per row"):
        bootstrap_ci(lambda h: {"mean": h.mean()}, np.arange(10.0), n_boot=20)


def test_grouped_bootstrap_moves_a_groups_items_together_and_widens_for_correlated_items():
    from pylon.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    person_value = rng.random(40)
    values = np.repeat(person_value, 5)  # five identical films per person: 40 independent values, not 200
    people = np.repeat(np.arange(40), 5).astype(str)
    seen = []

    def statistic(a: np.ndarray) -> dict:
        seen.append(a)
        return {"mean": a.mean(-1)}

    grouped = bootstrap_ci(statistic, values, n_boot=2000, seed=1, groups=people)["mean"]
    resample = seen[-1][0]
    assert resample.shape == (200,) and all(np.sum(resample[:195] == v) % 5 == 0 for v in set(resample[:195]))
    flat = bootstrap_ci(lambda a: {"mean": a.mean(-1)}, values, n_boot=2000, seed=1)["mean"]
    per_person = bootstrap_ci(lambda a: {"mean": a.mean(-1)}, person_value, n_boot=2000, seed=1)["mean"]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(grouped) > 1.8 * width(flat)  # about sqrt(5) wider
    assert width(grouped) == pytest.approx(width(per_person), rel=0.15)

"""Readers and indexers on the real RSNA and Kaggle samples (skipped where they are absent)."""
from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array

from pylon.data.cache import build_cache
from pylon.data.readers import read_image
from pylon.data.sources import complete_records, kaggle, rsna
from pylon.data.splits import split_records


def test_real_rsna_dicoms_decode(rsna_sample):
    paths = sorted((rsna_sample / "stage_2_train_images").glob("*.dcm"))
    assert len(paths) == 16
    for path in paths:
        image = read_image(path)
        assert image.dtype == np.uint8 and image.shape == (1024, 1024)
        assert 20 < image.mean() < 235 and image.std() > 20  # a radiograph, not a flat field
        # an independent decoder (libjpeg via pylibjpeg) agrees up to IDCT rounding
        reference = pixel_array(pydicom.dcmread(path), decoding_plugin="pylibjpeg")
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 2


def index_and_cache(root, cache_dir) -> list:
    """The RSNA records as prepare_data completes them from the image cache's one read of each file."""
    return build_cache(rsna.index(root), cache_dir, image_size=64, workers=1, progress=False,
                       complete=complete_records).records


def test_real_rsna_index(rsna_sample, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        records = index_and_cache(rsna_sample, tmp_path)
    assert len(records) == 16
    assert sum(r.label for r in records) == 5
    assert sum(len(r.boxes) for r in records) == 10
    assert not caplog.records, caplog.text  # a clean label file: no problems to report
    with open(rsna_sample / "stage_2_train_labels.csv", newline="") as handle:
        expected = defaultdict(list)
        for row in csv.DictReader(handle):
            if row["Target"] == "1":
                expected[row["patientId"]].append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))
    assert {r.id: list(r.scored_boxes) for r in records if r.label} == dict(expected)
    assert {r.view for r in records} == {"AP", "PA"}
    assert all(isinstance(r.age, int) and 0 < r.age < 100 for r in records)
    assert {r.sex for r in records} <= {"M", "F"}
    assert all(r.detail_class for r in records)
    # the header fields equal what pydicom reads directly
    for record in records:
        ds = pydicom.dcmread(record.path, stop_before_pixels=True)
        assert (record.view, record.age, record.sex) == (ds.ViewPosition, int(ds.PatientAge), ds.PatientSex)
    assert index_and_cache(rsna_sample, tmp_path) == records  # and the same from the built cache


def test_real_kaggle_index_and_split(kermany, caplog):
    with caplog.at_level(logging.WARNING):
        records = kaggle.index(kermany)
    counts = Counter((r.split, r.label) for r in records)
    assert counts[("test", 0)] == 234 and counts[("test", 1)] == 390
    assert counts[("train", 0)] + counts[("train", 1)] == 5216
    assert counts[("train", 0)] == 1341
    assert "unparseable_name" not in caplog.text
    assert Counter(r.detail_class for r in records if r.label) == Counter(
        {"bacteria": 2530 + 242, "virus": 1345 + 148}
    )

    # The official split puts some children (same personN) in both train and test: split_records
    # keeps them out of train/val and its warning counts them.
    test_patients = {r.patient_id for r in records if r.split == "test"}
    shared = {r.patient_id for r in records if r.split == "train"} & test_patients
    result = split_records(records, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert Counter(r.label for r in result if r.split == "test") == Counter({0: 234, 1: 390})
    train_val = {r.patient_id for r in result if r.split in ("train", "val")}
    assert not train_val & test_patients
    n_dropped = sum(1 for r in records if r.split == "train" and r.patient_id in shared)
    assert len(result) == len(records) - n_dropped
    assert f"kaggle: {len(shared)} patients have images in the official test split and outside it; " \
           f"their {n_dropped} non-test images were dropped" in caplog.text


def test_the_nih_patient_map_groups_rsna_733_films_by_person(realdata, tmp_path, caplog):
    from pylon.config import load_config
    from pylon.data.pipeline import index_sources

    root = realdata / "rsna_733"
    if not (root / "nih_patient_map.csv").is_file():
        pytest.skip("rsna_733/nih_patient_map.csv absent")
    cfg = load_config("real_rsna_pylon_r18", [f"data.roots.rsna={root}", f"data.cache_dir={tmp_path}",
                                              "data.patient_maps={rsna: nih_patient_map.csv}", "data.folds=5"])
    with caplog.at_level(logging.INFO):
        records = index_sources(cfg.data)
    films_per_person = Counter(r.patient_id for r in records)
    assert len(records) == 733 and len(films_per_person) == 683
    assert sum(n for n in films_per_person.values() if n > 1) == 86
    assert "733 images belong to 683 people" in caplog.text

"""The source registry, and the NIH ChestX-ray14 source on a small generated folder laid out like
the download, from indexing through split and cache."""
from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pylon.config import ConfigError, DataConfig, load_config
from pylon.data.pipeline import prepare_data
from pylon.data.records import Box, DatasetLayoutError
from pylon.data.sources import SOURCES, exclusions, nih, reported_views

SIDE = 40


def test_registry_modules_have_the_source_interface():
    assert list(SOURCES) == ["kaggle", "rsna", "nih"]
    for module in SOURCES.values():
        assert isinstance(module.MARKER, str) and isinstance(module.OFFICIAL_TEST, bool) and callable(module.index)
    assert [name for name, module in SOURCES.items() if module.OFFICIAL_TEST] == ["kaggle"]
    assert all(isinstance(module.REPORT_VIEWS, tuple) for module in SOURCES.values())
    assert reported_views() == {"rsna": ("AP", "PA")}  # NIH's views are kept on its records, not reported
    assert all(isinstance(module.EXCLUDES, dict) and set(module.EXCLUDES) <= set(SOURCES) for module in SOURCES.values())


def test_sources_that_cannot_be_combined_are_declared_by_the_sources(monkeypatch):
    assert exclusions(["kaggle", "rsna"]) == exclusions(["nih"]) == []
    assert exclusions(["rsna", "nih"]) == [nih.EXCLUDES["rsna"]] == exclusions(["nih", "kaggle", "rsna"])
    monkeypatch.setattr(SOURCES["kaggle"], "EXCLUDES", {"rsna": "a made-up reason"})  # config reads the registry
    with pytest.raises(ConfigError, match=r"^data.sources: a made-up reason; use one$"):
        load_config("pylon_r50.yaml")


def test_every_source_root_is_named_in_data_roots():
    cfg = OmegaConf.structured(DataConfig)
    assert cfg.roots["kaggle"] == "datasets/kaggle"
    assert cfg.roots.get("nih") is None
    cfg.roots = {"nih": "/data/nih", "rsna": "/elsewhere/rsna"}
    assert cfg.roots["nih"] == "/data/nih"
    assert cfg.roots["rsna"] == "/elsewhere/rsna"


def test_registry_imports_without_torch_or_opencv():
    code = ("import sys, pylon.data, pylon.data.sources; "
            "print(sorted({'torch', 'cv2', 'albumentations'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# (Image Index, Finding Labels, Patient ID, Patient Age, Patient Gender, View Position, folder or None)
ENTRIES = [
    ("00000001_000.png", "Cardiomegaly", "1", "58", "M", "PA", "images_001/images"),
    ("00000001_001.png", "Pneumonia|Effusion", "1", "58", "M", "PA", "images_001/images"),
    ("00000002_000.png", "No Finding", "2", "81", "F", "AP", "images_002/images"),
    ("00000003_000.png", "Pneumonia", "3", "045Y", "F", "AP", "images"),
    ("00000004_000.png", "Infiltrate", "4", "412", "M", "PA", None),  # listed, not on disk
] + [(f"{i:08d}_000.png", "Pneumonia" if i % 3 == 0 else "No Finding", str(i), "30", "F", "PA", "images_003")
     for i in range(10, 40)]
BOXES = [
    ("00000001_001.png", "Pneumonia", "10.5", "12", "20", "16"),
    ("00000001_001.png", "Effusion", "5", "5", "10", "10"),
    ("00000003_000.png", "Pneumonia", "1", "2", "3", "4"),
    ("00000003_000.png", "Infiltrate", "20", "20", "8", "8"),
    ("00000003_000.png", "Atelectasis", "abc", "1", "2", "3"),  # bad number
    ("00000002_000.png", "Pneumonia", "4", "4", "8", "8"),  # on a negative image
    ("00000099_000.png", "Pneumonia", "4", "4", "8", "8"),  # image not listed
]


@pytest.fixture
def nih_root(tmp_path) -> Path:
    root = tmp_path / "nih"
    for name, *_, folder in ENTRIES:
        if folder is not None:
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((SIDE, SIDE), 100, np.uint8)).save(root / folder / name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                         "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""])
        writer.writerows([name, labels, 0, patient, age, sex, view, SIDE, SIDE, 0.14, 0.14, ""]
                         for name, labels, patient, age, sex, view, _ in ENTRIES)
    with open(root / "BBox_List_2017.csv", "w", newline="") as handle:
        handle.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")  # the real header, rows end in ',,,'
        csv.writer(handle).writerows([*row, "", "", ""] for row in BOXES)
    return root


def test_nih_index(nih_root, caplog):
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.nih"):
        records = nih.index(nih_root)
    by_id = {r.id: r for r in records}
    assert len(records) == len(ENTRIES) - 1 and "nih/00000004_000" not in by_id
    first, pneumonia, negative, flat = (by_id[f"nih/{n}"] for n in
                                        ("00000001_000", "00000001_001", "00000002_000", "00000003_000"))
    assert (first.label, pneumonia.label, negative.label, flat.label) == (0, 1, 0, 1)
    assert first.patient_id == pneumonia.patient_id == "nih-1" and flat.patient_id == "nih-3"
    assert (pneumonia.view, pneumonia.age, pneumonia.sex, pneumonia.source) == ("PA", 58, "M", "nih")
    assert (flat.view, flat.age, flat.sex) == ("AP", 45, "F")
    assert pneumonia.detail_class == "Pneumonia|Effusion"
    assert pneumonia.boxes == (Box(10.5, 12, 20, 16, "pneumonia"), Box(5, 5, 10, 10, "effusion"))
    assert flat.boxes == (Box(1, 2, 3, 4), Box(20, 20, 8, 8, "infiltrate"))
    assert pneumonia.scored_boxes == ((10.5, 12, 20, 16),) and negative.boxes == ()
    assert Path(flat.path) == nih_root / "images" / "00000003_000.png"
    assert Path(pneumonia.path) == nih_root / "images_001" / "images" / "00000001_001.png"
    for kind in ("missing_image: 1 (e.g. 00000004_000.png)", "bad_box: 1 (e.g. line 6)",
                 "negative_with_pneumonia_box: 1", "box_without_image: 1 (e.g. 00000099_000.png)"):
        assert kind in caplog.text


def test_nih_bad_first_box_row_is_counted(nih_root, caplog):
    bbox = nih_root / "BBox_List_2017.csv"
    header, *rows = bbox.read_text().splitlines()
    bbox.write_text("\n".join([header, "00000003_000.png,Atelectasis,1,2", *rows]) + "\n")  # two numbers, not four
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.nih"):
        records = {r.id: r for r in nih.index(nih_root)}
    assert "bad_box: 2 (e.g. line 2, line 7)" in caplog.text
    assert records["nih/00000003_000"].boxes == (Box(1, 2, 3, 4), Box(20, 20, 8, 8, "infiltrate"))


def test_nih_layout_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Data_Entry_2017.csv"):
        nih.index(tmp_path)


def test_nih_through_split_and_cache(nih_root, tmp_path):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "sources": ["nih"], "roots": {"nih": str(nih_root)}, "cache_dir": str(tmp_path / "cache"),
        "image_size": 64, "num_workers": 0, "val_fraction": 0.2, "test_fraction": 0.2})
    data = prepare_data(cfg, progress=False)
    assert len(data.cache) == len(ENTRIES) - 1 and all(len(data.rows[s]) for s in ("train", "val", "test"))
    patients = {s: {r.patient_id for r in data.records(s)} for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert "nih" in data.summary()
    boxes = {r.id: data.cache.boxes_in_cache_frame(i) for i, r in enumerate(data.cache.records)}
    scale = 64 / SIDE
    np.testing.assert_allclose(boxes["nih/00000001_001"], [[10.5 * scale, 12 * scale, 20 * scale, 16 * scale]])
    np.testing.assert_allclose(boxes["nih/00000003_000"], [[1 * scale, 2 * scale, 3 * scale, 4 * scale]])
    assert sum(len(b) for b in boxes.values()) == 2  # effusion and infiltrate boxes are not scored


def test_nih_list_that_is_not_utf8_or_is_empty(nih_root):
    entries = nih_root / "Data_Entry_2017.csv"
    header = entries.read_text().splitlines()[0]
    entries.write_bytes(entries.read_bytes().replace(b"No Finding", "No Finding \u2013 ok".encode("cp1252")))
    with pytest.raises(DatasetLayoutError, match=f"{entries} is not UTF-8 text"):
        nih.index(nih_root)
    entries.write_text(header + "\n")
    with pytest.raises(DatasetLayoutError, match=f"{entries} is empty"):
        nih.index(nih_root)


def _nih_config(nih_root: Path, tmp_path: Path, **data) -> Any:
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "sources": ["nih"], "roots": {"nih": str(nih_root)}, "cache_dir": str(tmp_path / "cache"), "image_size": 64,
        "num_workers": 0, **data})


def test_a_given_normalization_is_used_as_it_is(nih_root, tmp_path, monkeypatch):
    import pylon.data.pipeline as pipeline

    cfg = _nih_config(nih_root, tmp_path, normalize_from_train=True)
    computed = prepare_data(cfg, progress=False)
    monkeypatch.setattr(pipeline, "pixel_mean_std", lambda *a, **k: pytest.fail("normalisation computed again"))
    given = prepare_data(cfg, progress=False, normalization=(0.25, 0.5))
    assert (given.mean, given.std) == (0.25, 0.5) != (computed.mean, computed.std)


def test_an_empty_split_names_its_cause(nih_root, tmp_path):
    with pytest.raises(ConfigError, match=r"^the val split is empty: data.val_fraction=0.01 of 33 nih patients rounds "
                                          r"to none; raise data.val_fraction or add data$"):
        prepare_data(_nih_config(nih_root, tmp_path, val_fraction=0.01), progress=False)
    with pytest.raises(ConfigError, match=r"^the train split is empty: data.val_fraction=0.9 and "
                                          r"data.test_fraction=0.9 of 33 nih patients leave none for training"):
        prepare_data(_nih_config(nih_root, tmp_path, val_fraction=0.9, test_fraction=0.9), progress=False)
    for image in nih_root.glob("images*/**/*.png"):
        image.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"the train split is empty: none of the images could be read, see .*report"):
        prepare_data(_nih_config(nih_root, tmp_path), progress=False)
    for folder in nih_root.glob("images*"):
        shutil.rmtree(folder)
    with pytest.raises(ConfigError, match=f"data.roots.nih: no nih images found under {nih_root}"):
        prepare_data(_nih_config(nih_root, tmp_path), progress=False)

"""The RSNA and Kaggle indexers on small generated trees laid out like the official downloads."""
from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_files import write_dicom
from pylon.data.cache import ImageCache, build_cache
from pylon.data.readers import ImageReadError, read_image_with_header
from pylon.data.records import Box, DatasetLayoutError, Record
from pylon.data.sources import complete_records, kaggle, nih, rsna
from pylon.data.sources.kaggle import parse_patient
from pylon.data.sources.rsna import parse_age

SIZE = 128  # image side in the generated RSNA tree; boxes are checked against it

# (patientId, x, y, width, height, Target) rows; empty strings where the official file has none
LABEL_ROWS = [
    ("neg", "", "", "", "", "0"),
    ("multi", "10", "20", "30", "40", "1"),
    ("multi", "60", "20", "30", "40", "1"),
    ("multi", "30", "70", "20", "20.5", "1"),
    ("one", "5", "5", "50", "60", "1"),
    ("nobox", "", "", "", "", "1"),
    ("sizes", "10", "10", "20", "20", "1"),
    ("sizes", "10", "10", "0", "20", "1"),
    ("sizes", "10", "10", "20", "-5", "1"),
    ("clip", "100", "-10", "50", "30", "1"),
    ("outside", "200", "10", "20", "20", "1"),
    ("outside", "1", "2", "3", "4", "1"),
    ("negbox", "10", "10", "20", "20", "0"),
    ("gone", "10", "10", "20", "20", "1"),
    ("conflict", "", "", "", "", "0"),
    ("conflict", "10", "10", "20", "20", "1"),
    ("dup", "10", "10", "20", "20", "1"),
    ("dup", "10", "10", "20", "20", "1"),
    ("badtarget", "", "", "", "", "2"),
    ("badvalue", "abc", "10", "20", "20", "1"),
    ("badvalue", "40", "40", "10", "10", "1"),
    ("incomplete", "", "10", "20", "20", "1"),
    ("", "", "", "", "", "0"),
    ("old", "", "", "", "", "0"),
    ("broken", "", "", "", "", "0"),
]
HEADERS = {  # patientId -> (view, age string, sex)
    "neg": ("PA", "045Y", "M"),
    "multi": ("AP", "58", "F"),
    "one": ("PA", "006M", "F"),
    "old": ("AP", "148", "M"),
}
CLASSES = {"neg": "Normal", "multi": "Lung Opacity", "negbox": "Lung Opacity"}


def write_rsna_tree(root: Path, pixels: np.ndarray) -> Path:
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    with open(root / "stage_2_train_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(LABEL_ROWS)
    with open(root / "stage_2_detailed_class_info.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "class"])
        writer.writerows(CLASSES.items())
    patients = {row[0] for row in LABEL_ROWS if row[0]} - {"gone", "broken"} | {"unlabelled"}
    for patient in sorted(patients):
        view, age, sex = HEADERS.get(patient, ("PA", "030Y", "M"))
        write_dicom(images / f"{patient}.dcm", pixels, transfer_syntax="explicit-little",
                    PatientID=patient, ViewPosition=view, PatientAge=age, PatientSex=sex)
    (images / "broken.dcm").write_bytes(b"not a dicom file" * 10)
    return root


@pytest.fixture
def rsna_tree(tmp_path, phantom) -> Path:
    return write_rsna_tree(tmp_path / "rsna", phantom(SIZE, SIZE))


def index_and_cache(root: Path, cache_dir: Path) -> ImageCache:
    """rsna.index, then the image cache, whose one read of each file completes the records (view,
    age, sex, boxes clipped to the image), as prepare_data runs them."""
    return build_cache(rsna.index(root), cache_dir, image_size=32, workers=1, progress=False, complete=complete_records)


def problem_counts(caplog, logger: str) -> dict[str, int]:
    """Kind -> count from the source's warnings (RSNA's indexing and completing give one each):
    every kind in one warning only."""
    messages = [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]
    found = [(kind, int(n)) for message in messages for kind, n in re.findall(r"(\w+): (\d+) \(e\.g\. ", message)]
    assert messages and len(found) == len(dict(found)), found
    return dict(found)


def test_rsna_records_boxes_and_header_fields(rsna_tree, tmp_path):
    records = index_and_cache(rsna_tree, tmp_path / "cache").records
    by_id = {r.id: r for r in records}
    assert set(by_id) == {"neg", "multi", "one", "nobox", "sizes", "clip", "outside", "negbox",
                          "dup", "badvalue", "incomplete", "old"}
    assert [r.id for r in records] == sorted(by_id)
    for record in records:
        assert record.source == "rsna" and record.patient_id == record.id and record.split is None
        assert Path(record.path).is_absolute() and Path(record.path).is_file()
        assert Path(record.path).name == f"{record.id}.dcm"
        assert all(isinstance(b, Box) and b.finding == "pneumonia" for b in record.boxes)

    assert by_id["neg"].label == 0 and by_id["neg"].boxes == ()
    assert by_id["multi"].label == 1
    assert by_id["multi"].boxes == ((10, 20, 30, 40, "pneumonia"), (60, 20, 30, 40, "pneumonia"),
                                    (30, 70, 20, 20.5, "pneumonia"))
    assert by_id["multi"].scored_boxes == ((10, 20, 30, 40), (60, 20, 30, 40), (30, 70, 20, 20.5))
    assert by_id["one"].boxes == (Box(5, 5, 50, 60),)
    assert by_id["nobox"].label == 1 and by_id["nobox"].boxes == ()
    assert by_id["sizes"].boxes == (Box(10, 10, 20, 20),)
    assert by_id["clip"].boxes == (Box(100, 0, SIZE - 100, 20),)
    assert by_id["outside"].boxes == (Box(1, 2, 3, 4),)
    assert by_id["negbox"].label == 0 and by_id["negbox"].boxes == ()
    assert by_id["dup"].boxes == (Box(10, 10, 20, 20),)
    assert by_id["badvalue"].boxes == (Box(40, 40, 10, 10),)
    assert by_id["incomplete"].label == 1 and by_id["incomplete"].boxes == ()

    assert (by_id["neg"].view, by_id["neg"].age, by_id["neg"].sex) == ("PA", 45, "M")
    assert (by_id["multi"].view, by_id["multi"].age, by_id["multi"].sex) == ("AP", 58, "F")
    assert by_id["one"].age == 0
    assert by_id["old"].age is None
    assert by_id["multi"].detail_class == "Lung Opacity" and by_id["clip"].detail_class is None


def test_rsna_warning_counts_every_malformed_kind(rsna_tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cache = index_and_cache(rsna_tree, tmp_path / "cache")
    assert problem_counts(caplog, "pylon.data.sources.rsna") == {
        "non_positive_box_size": 2,
        "box_clipped": 1,
        "box_outside_image": 1,
        "negative_with_box": 1,
        "missing_image": 1,
        "conflicting_target": 1,
        "duplicate_box": 1,
        "bad_target": 1,
        "bad_box_value": 1,
        "incomplete_box": 1,
        "missing_patient_id": 1,
        "positive_without_box": 2,  # 'nobox' and 'incomplete'
        "implausible_age": 1,
        "image_without_label": 2,  # 'unlabelled', and 'badtarget' whose only row was dropped
        "detail_class_conflict": 1,  # 'negbox' is Target 0 but 'Lung Opacity'
    }
    assert "missing_image: 1 (e.g. gone)" in caplog.text and "conflicting_target: 1 (e.g. conflict)" in caplog.text
    # a file that cannot be read is the image cache's to report, once, like any other source's
    assert [u["id"] for u in cache.unreadable] == ["broken"] and caplog.text.count("skipped 1 unreadable image,") == 1


def test_rsna_warning_says_what_became_of_each_kind(rsna_tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.rsna"):
        index_and_cache(rsna_tree, tmp_path / "cache")
    for said in ("conflicting_target: 1 (e.g. conflict) -> patient dropped", "missing_image: 1 (e.g. gone) -> patient "
                 "dropped", "box_clipped: 1 (e.g. clip (100, -10, 50, 30)) -> box clipped to the image",
                 "positive_without_box: 2 (e.g. incomplete, nobox) -> image kept, not scored for localization"):
        assert said in caplog.text


@pytest.mark.parametrize("module", [rsna, kaggle, nih])
def test_every_kind_of_indexing_problem_says_what_became_of_it(module):
    source = Path(module.__file__).read_text()
    kinds = {kind for key in re.findall(r"problems\[([^\]]+)\]", source) for kind in re.findall(r'"(\w+)"', key)}
    assert kinds and kinds <= set(module.EFFECTS), kinds - set(module.EFFECTS)


def test_rsna_finds_upper_case_dcm_files_and_names_broken_links(rsna_tree, tmp_path, caplog):
    images = rsna_tree / "stage_2_train_images"
    (images / "one.dcm").rename(images / "one.DCM")
    (images / "neg.dcm").unlink()
    (images / "neg.dcm").symlink_to(images / "moved-away.dcm")
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.rsna"):
        by_id = {r.id: r for r in index_and_cache(rsna_tree, tmp_path / "cache").records}
    assert Path(by_id["one"].path).name == "one.DCM" and by_id["one"].boxes == (Box(5, 5, 50, 60),)
    counts = problem_counts(caplog, "pylon.data.sources.rsna")
    assert counts["broken_symlink"] == 1 and counts["missing_image"] == 1  # 'neg' is broken, 'gone' missing
    assert "broken_symlink: 1 (e.g. neg) -> patient dropped" in caplog.text and "neg" not in by_id


def test_read_labels_gives_raw_boxes_by_patient(rsna_tree):
    targets, boxes = rsna.read_labels(rsna_tree / "stage_2_train_labels.csv")
    assert targets["conflict"] == {0, 1} and targets["neg"] == {0} and "badtarget" not in targets
    assert boxes["multi"] == [(10, 20, 30, 40), (60, 20, 30, 40), (30, 70, 20, 20.5)]
    assert boxes["sizes"] == [(10, 10, 20, 20), (10, 10, 0, 20), (10, 10, 20, -5)]  # cleaned by index only
    assert "neg" not in boxes and boxes["badvalue"] == [(40, 40, 10, 10)]


def test_rsna_dicoms_are_opened_once_by_a_cold_build_and_never_by_a_warm_one(rsna_tree, tmp_path, monkeypatch):
    opened = []
    dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda path, *args, **kwargs: opened.append(Path(path).name)
                        or dcmread(path, *args, **kwargs))
    indexed = rsna.index(rsna_tree)
    assert not opened  # indexing reads the label files only
    cold = index_and_cache(rsna_tree, tmp_path / "cache")
    assert Counter(opened) == Counter(Path(r.path).name for r in indexed)  # each file once, 'broken' too
    assert all(n == 1 for n in Counter(opened).values()) and len(opened) == len(indexed) == len(cold) + 1
    opened.clear()
    warm = index_and_cache(rsna_tree, tmp_path / "cache")
    assert not opened and warm.path == cold.path and warm.records == cold.records


def test_rsna_header_fields_come_from_the_image_cache_until_a_file_changes(rsna_tree, tmp_path):
    first = index_and_cache(rsna_tree, tmp_path / "cache")
    # Edit the cached view of one file: a second run must take it from the cache...
    with open(first.path / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["id"] == "neg":
            row["ViewPosition"] = "LL"
    with open(first.path / "index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    second = {r.id: r for r in index_and_cache(rsna_tree, tmp_path / "cache").records}
    assert second["neg"].view == "LL"
    # ...until the file changes (new mtime), when it is read again.
    dicom = rsna_tree / "stage_2_train_images" / "neg.dcm"
    stat = dicom.stat()
    os.utime(dicom, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = {r.id: r for r in index_and_cache(rsna_tree, tmp_path / "cache").records}
    assert third["neg"].view == "PA"
    assert [r.id for r in first.records] == sorted(third)


def test_rsna_view_from_series_description(tmp_path, phantom):
    path = write_dicom(tmp_path / "a.dcm", phantom(8, 8), transfer_syntax="explicit-little", ViewPosition="",
                       SeriesDescription="view: ap", PatientAge="030Y", PatientSex="X")
    image, header = read_image_with_header(path)
    assert header == {"ViewPosition": "", "PatientAge": "030Y", "PatientSex": "X", "SeriesDescription": "view: ap"}
    (record,) = rsna.complete([Record("a", "a", "rsna", str(path), 0)], [header], [image.shape])
    assert (record.view, record.age, record.sex) == ("AP", 30, None)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image_with_header(tmp_path / "missing.dcm")


def test_rsna_layout_errors(tmp_path, rsna_tree):
    with pytest.raises(DatasetLayoutError, match="stage_2_train_labels.csv"):
        rsna.index(tmp_path / "nowhere")
    (rsna_tree / "stage_2_train_labels.csv").write_text("patientId,x,y,w,h,Target\nA,,,,,0\n")
    with pytest.raises(DatasetLayoutError, match=r"lacks column\(s\) \['width', 'height'\]"):
        rsna.index(rsna_tree)


@pytest.mark.parametrize("name", ["stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"])
def test_rsna_label_files_that_are_not_utf8_or_are_empty(rsna_tree, name):
    path = rsna_tree / name
    original = path.read_text()
    path.write_bytes(original.replace("neg,", "négatif,").encode("latin-1"))
    with pytest.raises(DatasetLayoutError, match=rf"{re.escape(str(path))} is not UTF-8 text \(byte 0xe9"):
        rsna.index(rsna_tree)
    for text in ("", original.splitlines()[0] + "\n\n"):
        path.write_text(text)
        with pytest.raises(DatasetLayoutError, match=rf"{re.escape(str(path))} is empty: no rows below a header"):
            rsna.index(rsna_tree)


@pytest.mark.parametrize(
    "text,years",
    [("045Y", 45), ("58", 58), ("006M", 0), ("018M", 1), ("010W", 0), ("400D", 1), ("", None),
     (None, None), ("abc", None)],
)
def test_parse_age(text, years):
    assert parse_age(text) == years


# ---------------------------------------------------------------- Kaggle

KAGGLE_FILES = {
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person3_virus_15.jpeg",
                        "person447_virus_921_1.jpeg", "IM-0200-0001.jpeg", ".DS_Store", "notes.txt"],
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg",
                     "NORMAL2-IM-0588-0001-0002.jpeg", "person9_bacteria_40.jpeg", "scan 01.png"],
    "train/OTHER": ["x.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1430-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
    "test/PNEUMONIA": ["person1_virus_6.jpeg", "person1_virus_7.jpg"],
    "test/NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0001.png"],
}


def write_kaggle_tree(root: Path) -> Path:
    tiny = Image.fromarray(np.full((8, 8), 128, np.uint8))
    for folder, names in KAGGLE_FILES.items():
        directory = root / "chest_xray" / folder
        directory.mkdir(parents=True)
        for name in names:
            if name.endswith((".jpeg", ".jpg", ".png")):
                tiny.save(directory / name, format="PNG" if name.endswith(".png") else "JPEG")
            else:
                (directory / name).write_text("x")
    return root


def test_kaggle_records(tmp_path, caplog):
    root = write_kaggle_tree(tmp_path / "kaggle")
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.kaggle"):
        records = kaggle.index(root)
    by_id = {r.id: r for r in records}
    assert len(records) == 17
    assert len(by_id) == 17
    assert by_id["kaggle/train/PNEUMONIA/person1_bacteria_1"].patient_id == "kaggle-person1"
    assert by_id["kaggle/test/PNEUMONIA/person1_virus_6"].patient_id == "kaggle-person1"
    assert by_id["kaggle/train/PNEUMONIA/person447_virus_921_1"].patient_id == "kaggle-person447"
    assert by_id["kaggle/train/NORMAL/IM-0115-0002"].patient_id == "kaggle-IM-0115"
    assert by_id["kaggle/train/NORMAL/NORMAL2-IM-1427-0001"].patient_id == "kaggle-NORMAL2-IM-1427"
    assert by_id["kaggle/train/NORMAL/NORMAL2-IM-0588-0001-0002"].patient_id == "kaggle-NORMAL2-IM-0588"
    assert by_id["kaggle/train/NORMAL/scan 01"].patient_id == "kaggle-scan 01"
    # same stem twice in one folder: the second gets its extension in the id
    assert {"kaggle/test/NORMAL/IM-0001-0001", "kaggle/test/NORMAL/IM-0001-0001.png"} <= set(by_id)

    assert by_id["kaggle/train/PNEUMONIA/person1_bacteria_1"].detail_class == "bacteria"
    assert by_id["kaggle/train/PNEUMONIA/person3_virus_15"].detail_class == "virus"
    assert by_id["kaggle/train/PNEUMONIA/IM-0200-0001"].detail_class is None
    assert by_id["kaggle/train/NORMAL/person9_bacteria_40"].detail_class == "normal"
    for record in records:
        split, folder = record.id.split("/")[1:3]
        assert record.split == split and record.source == "kaggle" and record.boxes == ()
        assert record.label == (folder == "PNEUMONIA")
        assert record.detail_class in ("bacteria", "virus", None) if record.label else record.detail_class == "normal"
        assert Path(record.path).is_absolute() and Path(record.path).is_file()
    assert sum(r.label for r in records) == 8

    assert problem_counts(caplog, "pylon.data.sources.kaggle") == {
        "unparseable_name": 1,
        "label_name_conflict": 1,
        "duplicate_id": 1,
        "skipped_file": 1,
        "unknown_folder": 1,
    }


def test_kaggle_broken_link_is_named_as_such_not_as_a_skipped_file(tmp_path, caplog):
    root = write_kaggle_tree(tmp_path / "kaggle")
    (root / "chest_xray" / "train" / "NORMAL" / "IM-0300-0001.jpeg").symlink_to(tmp_path / "elsewhere.jpeg")
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.kaggle"):
        records = kaggle.index(root)
    assert len(records) == 17
    assert problem_counts(caplog, "pylon.data.sources.kaggle")["skipped_file"] == 1  # notes.txt only
    assert "broken_symlink: 1 (e.g. train/NORMAL/IM-0300-0001.jpeg) -> file skipped" in caplog.text


def test_kaggle_root_without_its_test_folder_says_so(tmp_path, caplog):
    root = write_kaggle_tree(tmp_path / "kaggle")
    shutil.rmtree(root / "chest_xray" / "test")
    with caplog.at_level(logging.WARNING, logger="pylon.data.sources.kaggle"):
        records = kaggle.index(root)
    assert records and not [r for r in records if r.split == "test"]
    assert f"kaggle: {root / 'chest_xray'} has no test/ folder, the official test split" in caplog.text


def test_kaggle_root_may_be_the_chest_xray_folder(tmp_path):
    root = write_kaggle_tree(tmp_path / "kaggle")
    assert kaggle.index(root / "chest_xray") == kaggle.index(root)


def test_kaggle_layout_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="chest_xray"):
        kaggle.index(tmp_path / "empty")


@pytest.mark.parametrize(
    "stem,patient,detail",
    [
        ("person1_bacteria_1", "kaggle-person1", "bacteria"),
        ("person1_virus_7", "kaggle-person1", "virus"),
        ("IM-0115-0001", "kaggle-IM-0115", None),
        ("NORMAL2-IM-1427-0001", "kaggle-NORMAL2-IM-1427", None),
        ("person12", None, None),
        ("IM-0115", None, None),
    ],
)
def test_parse_patient(stem, patient, detail):
    assert parse_patient(stem) == (patient, detail)

"""The synthetic demo data: real layouts and names, consistent labels, opacities where the
boxes are, readable DICOMs, byte-for-byte determinism and an idempotent generate_demo."""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit

from pylon.data import index_kaggle, index_rsna, read_image
from pylon.data.synthetic import (
    MARKER_NAME,
    DemoSettings,
    generate_demo,
    main,
    plan_kaggle,
    plan_rsna,
    render_chest,
)

SMALL = dict(seed=3, n_kaggle_patients=10, n_rsna=8)
SMALL_SETTINGS = DemoSettings(**SMALL)

NORMAL_NAME = re.compile(r"(?:NORMAL2-)?IM-(\d{4})-0001(?:-\d{4})?\.jpeg")
PNEUMONIA_NAME = re.compile(r"person(\d+)_(bacteria|virus)_\d+\.jpeg")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("synthetic") / "demo", progress=False, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _patient_of(name: str) -> str:
    normal = re.fullmatch(r"((?:NORMAL2-)?IM-\d{4})-.*", name)
    return normal.group(1) if normal else name.split("_")[0]


def _brightest_patch(difference: np.ndarray, size: int = 15) -> float:
    """Largest local mean of (image - disease-free image): JPEG error averages out, an
    opacity does not."""
    return float(cv2.blur(difference.astype(np.float32), (size, size)).max())


def _label_rows(demo: Path) -> list[dict[str, str]]:
    with open(demo / "rsna" / "stage_2_train_labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------- Kaggle
def test_kaggle_layout_names_and_images(demo: Path) -> None:
    base = demo / "kaggle" / "chest_xray"
    assert sorted(p.name for p in base.iterdir()) == ["test", "train", "val"]
    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    images_of_patient: dict[str, int] = defaultdict(int)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (base / split).iterdir()) == ["NORMAL", "PNEUMONIA"]
        for folder, pattern in (("NORMAL", NORMAL_NAME), ("PNEUMONIA", PNEUMONIA_NAME)):
            files = sorted((base / split / folder).iterdir())
            assert files, f"{split}/{folder} is empty"
            for path in files:
                assert pattern.fullmatch(path.name), path.name
                splits_of_patient[_patient_of(path.name)].add(split)
                images_of_patient[_patient_of(path.name)] += 1
    assert all(len(splits) == 1 for splits in splits_of_patient.values()), splits_of_patient
    assert max(images_of_patient.values()) > 1  # follow-up films of one child

    sizes = set()
    for path in sorted(base.rglob("*.jpeg"))[:12]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L"
            width, height = image.size
        assert 300 <= width <= 480 and height < width  # landscape, like the originals
        sizes.add((width, height))
    assert len(sizes) > 3


def test_default_kaggle_plan_has_real_proportions() -> None:
    plans = plan_kaggle(DemoSettings())
    per_split = defaultdict(int)
    for plan in plans:
        per_split[plan.split, plan.folder] += 1
    assert 400 <= len(plans) <= 520
    assert per_split["val", "NORMAL"] == 4 and per_split["val", "PNEUMONIA"] == 4
    assert 0.15 < (per_split["test", "NORMAL"] + per_split["test", "PNEUMONIA"]) / len(plans) < 0.3
    assert len({p.patient_index for p in plans}) == 200
    assert len({p.relative_path for p in plans}) == len(plans)


def test_kaggle_pneumonia_has_opacities_inside_the_lungs_and_normal_has_none(demo: Path) -> None:
    base = demo / "kaggle"
    for plan in plan_kaggle(SMALL_SETTINGS):
        on_disk = np.asarray(Image.open(base / plan.relative_path), dtype=np.float64)
        clean = render_chest(plan.spec, with_opacities=False)
        difference = on_disk - clean.image
        if plan.folder == "NORMAL":
            assert _brightest_patch(difference) < 4.0, plan.name  # JPEG error only
            continue
        rendered = render_chest(plan.spec)
        assert rendered.boxes, plan.name
        for x, y, w, h in rendered.boxes:
            x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
            assert clean.lung_mask[y0:y1, x0:x1].mean() > 0.5, plan.name
            assert difference[y0:y1, x0:x1].mean() > 8.0, plan.name


# ---------------------------------------------------------------------------- RSNA
def test_rsna_label_files_match_the_official_format(demo: Path) -> None:
    rsna = demo / "rsna"
    with open(rsna / "stage_2_train_labels.csv", newline="") as handle:
        assert handle.readline().strip() == "patientId,x,y,width,height,Target"
    with open(rsna / "stage_2_detailed_class_info.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["patientId", "class"]
        classes = {row["patientId"]: row["class"] for row in reader}

    rows = _label_rows(demo)
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_patient[row["patientId"]].append(row)
    stems = {p.stem for p in (rsna / "stage_2_train_images").iterdir()}
    assert set(by_patient) == stems == set(classes)
    assert len(stems) == 8
    for patient, patient_rows in by_patient.items():
        assert UUID4.fullmatch(patient)
        targets = {row["Target"] for row in patient_rows}
        assert len(targets) == 1
        if targets == {"0"}:
            assert len(patient_rows) == 1
            assert [patient_rows[0][k] for k in ("x", "y", "width", "height")] == ["", "", "", ""]
            assert classes[patient] in ("Normal", "No Lung Opacity / Not Normal")
        else:
            assert 1 <= len(patient_rows) <= 3
            assert classes[patient] == "Lung Opacity"
            for row in patient_rows:
                x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
                assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 1024 and y + h <= 1024
    n_positive = sum(rows[0]["Target"] == "1" for rows in by_patient.values())
    assert 0 < n_positive < 8
    # One row per box: the rows agree with what the generator drew.
    n_boxes = sum(len(render_chest(p.spec).boxes) for p in plan_rsna(SMALL_SETTINGS) if p.label)
    assert sum(row["Target"] == "1" for row in rows) == n_boxes


def test_rsna_dicoms_read_back_with_real_headers(demo: Path) -> None:
    photometrics = []
    for path in sorted((demo / "rsna" / "stage_2_train_images").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (1024, 1024, 8, 8)
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition in ("AP", "PA") and ds.SeriesDescription == f"view: {ds.ViewPosition}"
        assert ds.PatientID == path.stem
        assert ds.PatientSex in ("M", "F") and 18 <= int(ds.PatientAge) <= 90
        assert all(0.139 <= float(s) <= 0.171 for s in ds.PixelSpacing)
        pixels = ds.pixel_array
        assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
        photometrics.append(ds.PhotometricInterpretation)
    assert set(photometrics) == {"MONOCHROME1", "MONOCHROME2"}


def test_monochrome1_files_hold_the_same_anatomy_inverted(demo: Path) -> None:
    images = demo / "rsna" / "stage_2_train_images"
    plans = [p for p in plan_rsna(SMALL_SETTINGS)]
    assert any(p.monochrome1 for p in plans)
    for plan in plans:
        path = images / f"{plan.patient_id}.dcm"
        stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
        expected = render_chest(plan.spec).image.astype(np.float64)
        if plan.monochrome1:
            expected = 255.0 - expected
        assert np.abs(stored - expected).mean() < 3.0, path.name
        # The project's reader undoes MONOCHROME1: air dark, body bright, either way.
        seen = read_image(path).astype(np.float64)
        assert seen[:, :40].mean() < seen[400:600, 470:550].mean()


def test_rsna_opacities_fill_their_boxes_inside_the_lungs(demo: Path) -> None:
    rows = _label_rows(demo)
    images = demo / "rsna" / "stage_2_train_images"
    n_checked = 0
    for plan in plan_rsna(SMALL_SETTINGS):
        seen = read_image(images / f"{plan.patient_id}.dcm").astype(np.float64)
        clean = render_chest(plan.spec, with_opacities=False)
        difference = seen - clean.image
        boxes = [tuple(float(r[k]) for k in ("x", "y", "width", "height"))
                 for r in rows if r["patientId"] == plan.patient_id and r["Target"] == "1"]
        if not plan.label:
            assert not boxes and _brightest_patch(difference) < 4.0
            continue
        outside = np.ones(seen.shape, bool)
        for x, y, w, h in boxes:
            x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
            inside_lungs = clean.lung_mask[y0:y1, x0:x1]
            assert inside_lungs.mean() > 0.5, (plan.patient_id, x, y, w, h)
            centre_y, centre_x = (y0 + y1) // 2, (x0 + x1) // 2
            assert clean.lung_mask[centre_y - 20:centre_y + 20, centre_x - 20:centre_x + 20].any()
            # Brighter than the same lung region without disease, by a visible margin.
            assert difference[y0:y1, x0:x1][inside_lungs].mean() > 8.0
            outside[y0:y1, x0:x1] = False
            n_checked += 1
        # ...and nowhere else: outside the boxes the image is the disease-free one.
        assert _brightest_patch(np.where(outside, difference, 0.0)) < 4.0
    assert n_checked > 0


# ---------------------------------------------------------------------------- whole set
def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert main(["--out", str(again), "--seed", "3", "--n-kaggle-patients", "10", "--n-rsna", "8"]) == 0
    first, second = _files(demo), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []

    other = plan_rsna(DemoSettings(**dict(SMALL, seed=4)))
    assert [p.patient_id for p in other] != [p.patient_id for p in plan_rsna(SMALL_SETTINGS)]


def test_generate_demo_is_idempotent_and_replaces_only_its_own_output(demo: Path, tmp_path: Path) -> None:
    marker = demo / MARKER_NAME
    stamps = {p: p.stat().st_mtime_ns for p in (marker, *sorted(demo.rglob("*.dcm"))[:2])}
    assert generate_demo(demo, progress=False, **SMALL) == demo
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    out = tmp_path / "demo"
    generate_demo(out, progress=False, **SMALL)
    generate_demo(out, progress=False, **dict(SMALL, n_rsna=4))  # other settings: rebuilt
    assert len(list((out / "rsna" / "stage_2_train_images").iterdir())) == 4
    assert not (tmp_path / ".demo.partial").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a demo set")
    with pytest.raises(FileExistsError, match="mine"):
        generate_demo(foreign, progress=False, **SMALL)
    assert (foreign / "notes.txt").read_text() == "not a demo set"


def test_bad_settings_are_refused_with_the_setting_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="n_kaggle_patients"):
        generate_demo(tmp_path / "x", n_kaggle_patients=2, progress=False)
    assert main(["--out", str(tmp_path / "y"), "--n-rsna", "1"]) == 2
    assert "n_rsna" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_project_indexers_read_the_generated_set(demo: Path) -> None:
    kaggle = index_kaggle(demo / "kaggle")
    assert len(kaggle) == len(list((demo / "kaggle").rglob("*.jpeg")))
    assert {r.split for r in kaggle} == {"train", "val", "test"}
    patients_split = defaultdict(set)
    for record in kaggle:
        patients_split[record.patient_id].add(record.split)
        assert record.label == (1 if "/PNEUMONIA/" in record.id + "/" else 0)
    assert all(len(s) == 1 for s in patients_split.values())

    rsna = index_rsna(demo / "rsna")
    rows = _label_rows(demo)
    assert len(rsna) == 8
    assert sum(len(r.boxes) for r in rsna) == sum(row["Target"] == "1" for row in rows)
    for record in rsna:
        assert record.label == (1 if record.boxes else 0)
        assert record.view in ("AP", "PA") and record.sex in ("M", "F") and record.age is not None
        assert (record.detail_class == "Lung Opacity") == bool(record.label)

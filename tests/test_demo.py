"""The demo data (tools/make_demo.py): real layouts and names, consistent labels, opacities where
the boxes are, readable DICOMs, byte-for-byte determinism and an idempotent, careful generate_demo;
a demo config without its data, or with the removed data.generate_demo, says what to run."""
from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit

from conftest import load_script
from pylon import cli
from pylon.config import ConfigError, load_config
from pylon.data.pipeline import index_sources

make_demo = load_script("tools/make_demo")
MARKER, main, render = make_demo.MARKER, make_demo.main, make_demo.render
generate_demo, is_generated_demo = make_demo.generate_demo, make_demo.is_generated_demo
plan_kaggle, plan_rsna = make_demo.plan_kaggle, make_demo.plan_rsna

SMALL = dict(seed=3, n_kaggle_patients=10, n_rsna=8)
NORMAL = re.compile(r"((?:NORMAL2-)?IM-\d{4})-0001(?:-\d{4})?\.jpeg")
PNEUMONIA = re.compile(r"(person\d+)_(?:bacteria|virus)_\d+\.jpeg")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", progress=False, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _opacity_only_in_boxes(pixels: np.ndarray, clean: np.ndarray, boxes: list) -> None:
    """The file differs from the disease-free rendering inside every box, and only there."""
    difference = pixels.astype(np.float64) - clean
    outside = np.ones(pixels.shape, bool)
    for x, y, w, h in boxes:
        assert 0 <= x and 0 <= y and x + w <= pixels.shape[1] and y + h <= pixels.shape[0]
        window = difference[int(y): int(y + h), int(x): int(x + w)]
        assert window.mean() > 6.0 and window.max() > 25.0  # a bright opacity fills the box
        outside[int(y): int(y + h), int(x): int(x + w)] = False
    # Outside the boxes only JPEG error (and the opacities' faint rims): small in every 8x8 block.
    height, width = (s // 8 * 8 for s in pixels.shape)
    blocks = np.where(outside, difference, 0.0)[:height, :width].reshape(height // 8, 8, width // 8, 8)
    assert np.abs(blocks.mean(axis=(1, 3))).max() < 8.0


def test_kaggle_layout_names_and_labels(demo: Path) -> None:
    base = demo / "kaggle" / "chest_xray"
    assert sorted(p.name for p in base.iterdir()) == ["test", "train", "val"]
    splits, films = defaultdict(set), defaultdict(int)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (base / split).iterdir()) == ["NORMAL", "PNEUMONIA"]
        for folder, pattern in (("NORMAL", NORMAL), ("PNEUMONIA", PNEUMONIA)):
            paths = sorted((base / split / folder).iterdir())
            assert paths, f"{split}/{folder} is empty"
            for path in paths:
                patient = pattern.fullmatch(path.name).group(1)
                splits[patient].add(split)
                films[patient] += 1
    assert len(splits) == SMALL["n_kaggle_patients"]
    assert all(len(s) == 1 for s in splits.values())  # every child in one split
    assert max(films.values()) > 1
    for path in sorted(base.rglob("*.jpeg"))[:10]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L"
            assert 1.28 < image.width / image.height < 1.52  # landscape, like the children's films
    films = plan_kaggle(0, 200)  # the default set: about 74% pneumonia, several films a child
    assert 0.7 < np.mean([f.label for f in films]) < 0.8 and 350 < len(films) < 500


def test_rsna_label_files_and_dicom_headers(demo: Path) -> None:
    rsna = demo / "rsna"
    rows = _rows(rsna / "stage_2_train_labels.csv")
    classes = _rows(rsna / "stage_2_detailed_class_info.csv")
    assert list(rows[0]) == ["patientId", "x", "y", "width", "height", "Target"]
    assert [c["patientId"] for c in classes] == [r["patientId"] for r in rows]  # one class row per label row
    for row, c in zip(rows, classes):
        expected = ("Lung Opacity",) if row["Target"] == "1" else ("Normal", "No Lung Opacity / Not Normal")
        assert c["class"] in expected
    by_patient = defaultdict(list)
    for row in rows:
        by_patient[row["patientId"]].append(row)
    assert set(by_patient) == {p.stem for p in (rsna / "stage_2_train_images").iterdir()}
    assert len(by_patient) == SMALL["n_rsna"]
    positives = 0
    for patient, patient_rows in by_patient.items():
        assert UUID4.fullmatch(patient)
        targets = {r["Target"] for r in patient_rows}
        if targets == {"0"}:
            assert [[r[k] for k in ("x", "y", "width", "height")] for r in patient_rows] == [["", "", "", ""]]
        else:
            assert targets == {"1"} and 1 <= len(patient_rows) <= 2
            positives += 1
        ds = pydicom.dcmread(rsna / "stage_2_train_images" / f"{patient}.dcm")
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert (ds.Rows, ds.Columns, ds.BitsStored, ds.PhotometricInterpretation) == (512, 512, 8, "MONOCHROME2")
        assert ds.PatientID == patient and ds.ViewPosition in ("AP", "PA") and ds.PatientSex in ("M", "F")
        assert 18 <= int(ds.PatientAge) <= 90
        assert ds.pixel_array.shape == (512, 512) and ds.pixel_array.dtype == np.uint8
    assert 0 < positives < len(by_patient)
    assert 0.3 < np.mean([f.label for f in plan_rsna(0, 360)]) < 0.4


def test_boxes_lie_over_the_opacities_and_nothing_else_differs(demo: Path) -> None:
    rows = _rows(demo / "rsna" / "stage_2_train_labels.csv")
    for film in plan_rsna(SMALL["seed"], SMALL["n_rsna"]):
        pixels = pydicom.dcmread(demo / film.path).pixel_array
        boxes = [tuple(float(r[k]) for k in ("x", "y", "width", "height"))
                 for r in rows if r["patientId"] == film.header["PatientID"] and r["Target"] == "1"]
        assert boxes == render(film)[1] and len(boxes) == film.n_opacities
        _opacity_only_in_boxes(pixels, render(film, with_opacities=False)[0], boxes)
    for film in plan_kaggle(SMALL["seed"], SMALL["n_kaggle_patients"]):
        pixels, boxes = np.asarray(Image.open(demo / film.path)), render(film)[1]
        assert ("PNEUMONIA" in film.path) == bool(film.n_opacities) == bool(boxes)
        _opacity_only_in_boxes(pixels, render(film, with_opacities=False)[0], boxes)


def test_same_seed_same_bytes_other_seed_other_data(demo: Path, tmp_path: Path) -> None:
    main(["--out", str(tmp_path / "again"), "--seed", "3", "--n-kaggle-patients", "10", "--n-rsna", "8"])
    first, second = _files(demo), _files(tmp_path / "again")
    assert first.keys() == second.keys() and [k for k in first if first[k] != second[k]] == []
    assert [f.path for f in plan_rsna(4, 8)] != [f.path for f in plan_rsna(3, 8)]


def test_generate_demo_reuses_its_own_set_and_replaces_only_a_demo_set(demo: Path, tmp_path: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in sorted(demo.rglob("*")) if p.is_file()}
    assert generate_demo(demo, progress=False, **SMALL) == demo and is_generated_demo(demo)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    out = tmp_path / "demo"
    generate_demo(out, n_kaggle_patients=6, n_rsna=2, progress=False)
    generate_demo(out, n_kaggle_patients=6, n_rsna=3, progress=False)  # other settings: rebuilt
    assert len(list((out / "rsna" / "stage_2_train_images").iterdir())) == 3
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**marker, "generator_version": 1}))  # an older generator's set
    assert not is_generated_demo(out)
    generate_demo(out, n_kaggle_patients=6, n_rsna=3, progress=False)
    assert is_generated_demo(out) and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging left


def test_a_folder_that_is_not_a_demo_set_is_never_overwritten(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a demo set")
    with pytest.raises(FileExistsError, match="mine.*not a demo set"):
        generate_demo(mine, progress=False)
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        main(["--out", str(mine)])
    with pytest.raises(ValueError, match="n_kaggle_patients=2"):
        generate_demo(tmp_path / "x", n_kaggle_patients=2, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]
    assert not is_generated_demo(mine)


def test_a_demo_config_without_its_data_says_how_to_make_it(tmp_path, capsys) -> None:
    train = load_script("train")
    overrides = [f"data.roots.kaggle={tmp_path / 'demo' / 'kaggle'}", f"data.roots.rsna={tmp_path / 'demo' / 'rsna'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "logging.wandb_mode=disabled", f"logging.runs_dir={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit) as code:  # as train.py ends when run from the command line
        cli.run(train.main, ["--config", "demo.yaml", "--set", *overrides])
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert code.value.code == 2 and line.startswith(f"error: data.roots.kaggle: {tmp_path / 'demo' / 'kaggle'} has no ")
    assert line.endswith(f"run python tools/make_demo.py --out {tmp_path / 'demo'} (or make demo, which writes datasets/demo)")
    assert not (tmp_path / "demo").exists() and not (tmp_path / "runs").exists()  # nothing generated, no run left
    with pytest.raises(ConfigError, match="download the data"):  # data elsewhere is downloaded, not generated
        index_sources(load_config("demo.yaml", [f"data.roots.kaggle={tmp_path / 'kaggle'}"]).data)


@pytest.mark.parametrize("how", ["file", "--set"])
def test_an_old_config_setting_generate_demo_is_told_what_to_run(tmp_path, how) -> None:
    config = tmp_path / "old.yaml"
    config.write_text("extends: " + str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml") + "\n"
                      + ("data:\n  generate_demo: true\n" if how == "file" else ""))
    origin = str(config) if how == "file" else "--set"
    with pytest.raises(ConfigError) as info:
        load_config(config, ["data.generate_demo=true"] if how == "--set" else [])
    assert str(info.value) == (f"{origin}: 'data.generate_demo' was removed: training no longer writes the demo data; "
                               "make it once with python tools/make_demo.py --out datasets/demo (or make demo) "
                               "and delete the key")

"""predict.py on a tiny real run: DICOM / PNG / JPEG files written here, a corrupt file, the
real RSNA samples, and agreement with the evaluation pipeline's cached inputs."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import load_script, make_phantom
from dicom_files import write_dicom
from pylon.checkpoint import load_checkpoint, save_checkpoint
from pylon.config import ConfigError
from pylon.data.cache import resize_image
from pylon.data.pipeline import prepare_data
from pylon.evaluation import predict_split
from pylon.inference import _on_original, load_run
from pylon.plots import BOX_COLOUR
from pylon.runs import RunPaths

predict = load_script("predict")


def run_predict(run: Path, out: Path, *args) -> tuple[int, pd.DataFrame]:
    code = predict.main([*map(str, args), "--run", str(run), "--out", str(out)])
    return code, pd.read_csv(out / "predictions.csv", keep_default_na=False)


def green_pixels(path: Path) -> int:
    return int(np.all(np.asarray(Image.open(path).convert("RGB")) == BOX_COLOUR, axis=-1).sum())


def test_dicom_png_jpeg_are_predicted_and_a_corrupt_file_is_reported(tiny_run, tmp_path, capsys):
    run = tiny_run
    phantom = make_phantom(300, 400)  # non-square: the stretch resize must map the peak back
    files = {
        "chest.dcm": write_dicom(tmp_path / "in" / "chest.dcm", make_phantom(512, 512), transfer_syntax="rle"),
        "chest.png": tmp_path / "in" / "chest.png",
        "chest.jpg": tmp_path / "in" / "chest.jpg",
        "broken.dcm": tmp_path / "in" / "broken.dcm",
    }
    Image.fromarray(phantom).save(files["chest.png"])
    Image.fromarray(phantom).save(files["chest.jpg"], quality=92)
    files["broken.dcm"].write_bytes(b"\x00" * 128 + b"DICM" + b"not a dataset")
    from pydicom.data import get_testdata_file

    files["badVR.dcm"] = Path(get_testdata_file("badVR.dcm"))  # a malformed integer header: NumberOfFrames '1A'
    order = ["chest.dcm", "broken.dcm", "badVR.dcm", "chest.png", "chest.jpg"]

    code, table = run_predict(run, tmp_path / "out", *[files[n] for n in order])
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot read image {files['broken.dcm']}" in err
    assert list(table.file) == [str(files[n]) for n in order]
    for bad in ("broken", "badVR"):  # reported by name; the rest of the batch goes on
        row = table[table.id == bad].iloc[0]
        assert "cannot read image" in row.error and row.probability == ""
    assert f"cannot read image {files['badVR.dcm']}" in err
    good = table[table.error == ""]
    assert len(good) == 3 and set(good.method) == {"pylon"}
    for row in good.itertuples():
        assert 0.0 <= float(row.probability) <= 1.0
        height, width = (512, 512) if row.id == "chest" and row.file.endswith(".dcm") else phantom.shape
        assert 0 <= float(row.peak_x) <= width and 0 <= float(row.peak_y) <= height
        overlay = Image.open(row.overlay)
        assert overlay.size == (width, height)
    assert len(set(good.overlay)) == 3  # the same stem twice does not overwrite an overlay
    # PNG and JPEG of the same pixels give nearly the same answer.
    png, jpg = good[good.file.str.endswith(".png")].iloc[0], good[good.file.str.endswith(".jpg")].iloc[0]
    assert float(png.probability) == pytest.approx(float(jpg.probability), abs=0.05)


def test_probabilities_equal_the_evaluation_pipeline_on_the_original_files(tiny_run, tmp_path):
    """predict.py reads and resizes each file itself; the result must be what the model saw
    from the cache during evaluation."""
    run = tiny_run
    trained = load_run(RunPaths(run))
    data = prepare_data(trained.cfg.data, progress=False)
    expected = predict_split(trained, data, "test")
    paths = [data.cache.records[r].path for r in expected.rows]
    code, table = run_predict(run, tmp_path / "out", *paths)
    assert code == 0 and list(table.file) == paths
    np.testing.assert_allclose(table.probability.astype(float), expected.probs, atol=1e-5)


def test_boxes_csv_draws_ground_truth_for_listed_patients(tiny_run, tiny_data, tmp_path):
    run = tiny_run
    labels = tiny_data / "rsna" / "stage_2_train_labels.csv"
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    positive = next(r["patientId"] for r in rows if r["Target"] == "1")
    image = tiny_data / "rsna" / "stage_2_train_images" / f"{positive}.dcm"
    _, with_boxes = run_predict(run, tmp_path / "with", image, "--boxes-csv", labels)
    _, without = run_predict(run, tmp_path / "without", image)
    assert green_pixels(Path(with_boxes.overlay[0])) > 100
    assert green_pixels(Path(without.overlay[0])) == 0
    with pytest.raises(FileNotFoundError, match="boxes-csv"):
        predict.main([str(image), "--run", str(run), "--boxes-csv", str(tmp_path / "missing.csv")])
    with pytest.raises(ConfigError, match="gradcam"):
        predict.main([str(image), "--run", str(run), "--method", "gradcam", "--out", str(tmp_path / "x")])


def test_real_rsna_dicoms(tiny_run, rsna_sample, tmp_path):
    run = tiny_run
    images = sorted((rsna_sample / "stage_2_train_images").glob("*.dcm"))
    code, table = run_predict(run, tmp_path / "out", *images, "--boxes-csv", rsna_sample / "stage_2_train_labels.csv")
    assert code == 0 and len(table) == len(images) == 16
    probs = table.probability.astype(float)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert ((table.peak_x.astype(float) >= 0) & (table.peak_x.astype(float) <= 1024)).all()
    positives = set(pd.read_csv(rsna_sample / "stage_2_train_labels.csv").query("Target == 1").patientId)
    for row in table.itertuples():
        assert Image.open(row.overlay).size == (1024, 1024)
        assert (green_pixels(Path(row.overlay)) > 0) == (row.id in positives)


def test_normalisation_comes_with_the_checkpoint(tiny_run, tmp_path):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    paths = RunPaths(run)
    config = yaml.safe_load(paths.config.read_text())["data"]
    state = load_checkpoint(paths.best)
    assert state["normalization"] == pytest.approx({"mean": config["mean"], "std": config["std"]})
    state["normalization"] = {"mean": 0.25, "std": 0.5}  # e.g. computed with data.normalize_from_train
    save_checkpoint(paths.best, state)
    assert load_run(paths).mean_std == (0.25, 0.5)


def test_the_prior_of_a_run_without_one_is_refused_in_one_line(tiny_run, tmp_path):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    state = load_checkpoint(RunPaths(run).best)
    state["prior"] = None  # what a training split without boxes stores
    save_checkpoint(RunPaths(run).best, state)
    image = tmp_path / "x.png"
    Image.fromarray(make_phantom(64, 64)).save(image)
    with pytest.raises(ConfigError, match=r"--method prior: its training split had no boxes.*\['pylon', 'center'\]"):
        predict.main([str(image), "--run", str(run), "--out", str(tmp_path / "out"), "--method", "prior"])


def test_letterboxed_heatmaps_are_cut_to_the_image_before_overlaying():
    image = make_phantom(60, 120)
    _, geometry = resize_image(image, 64, "letterbox")  # 64 x 32 content, 16 px bars above and below
    heat = torch.zeros(16, 16)
    heat[4:12, :] = 1.0  # the content rows of a 1/4-resolution map
    heat[0, 0] = 2.0  # the map's maximum, on the top bar
    heat[8, 12] = 1.5  # the film's own peak
    cut, peak = _on_original(heat, geometry, 64)
    assert cut.shape == (32, 64)
    assert cut.min() > 0.5 and cut.max() < 2.0  # no padding rows left in
    assert 0 <= peak[1] < 60 and abs(peak[0] - 12.5 * 4 * 120 / 64) < 4  # inside the film, at its own peak


def test_heatmap_grid_figure_draws_a_row_per_image_and_a_column_per_method(tiny_run, tmp_path):
    grid = load_script("docs/heatmap_grid")
    image = tmp_path / "phantom.png"
    Image.fromarray(make_phantom(96, 80)).save(image)
    one_row, two_rows = tmp_path / "one.png", tmp_path / "two.png"
    assert grid.main([str(image), "--run", str(tiny_run), "--out", str(one_row)]) == 0
    assert grid.main([str(image), str(image), "--run", str(tiny_run), "--out", str(two_rows)]) == 0
    (h1, w1), (h2, w2) = (Image.open(p).size[::-1] for p in (one_row, two_rows))
    assert w1 == w2 and h2 > 1.8 * h1  # image + PYLON columns; one more row
    with pytest.raises(ConfigError, match="none of --methods gradcam applies"):
        grid.main([str(image), "--run", str(tiny_run), "--methods", "gradcam", "--out", str(tmp_path / "x.png")])


def test_an_image_far_smaller_than_the_model_input_is_warned_about(tiny_run, tmp_path, capsys):
    tiny, normal = tmp_path / "tiny.png", tmp_path / "normal.png"
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tiny)
    Image.fromarray(make_phantom(64, 64)).save(normal)
    assert predict.main([str(tiny), str(normal), "--run", str(tiny_run), "--out", str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tiny} is 3x3 pixels, far smaller than the model's 64x64 input; "
                        "its prediction means little"]


def test_bad_flags_fail_in_one_line_naming_the_flag(tiny_run, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(make_phantom(64, 64)).save(image)
    with pytest.raises(ConfigError, match="--device banana: expected cpu, cuda or cuda:N"):
        predict.main([str(image), "--run", str(tiny_run), "--device", "banana"])
    with pytest.raises(ConfigError, match="--out .* is a file"):
        predict.main([str(image), "--run", str(tiny_run), "--out", str(image)])
    with pytest.raises(ConfigError, match="--out=.*x.png/out is not writable .*; give --out <a folder you can write>"):
        predict.main([str(image), "--run", str(tiny_run), "--out", str(image / "out")])
    with pytest.raises(ConfigError, match="is not a run folder"):
        predict.main([str(image), "--run", str(tmp_path)])


def test_a_wrong_run_fails_before_the_heavy_imports(tmp_path):
    import subprocess
    import sys

    for script in ("evaluate.py", "predict.py"):
        args = [str(Path(__file__).resolve().parents[1] / script), "--run", str(tmp_path / "nowhere")]
        args += ["x.png"] if script == "predict.py" else []
        done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "is not a run folder" in done.stderr
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported and "pylon.inference" not in imported, script

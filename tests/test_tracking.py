"""Tracking: real offline W&B runs read back with wandb's own reader, and history.csv."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pylon.tracking import (
    HISTORY_FILE,
    Tracker,
    _prepare_image,
    latest_wandb_run_id,
    read_history,
    resolve_mode,
)

from conftest import read_wandb_records


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """Keep wandb off the network and its caches/staging inside the test folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def history_rows(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def gray_image(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


# ------------------------------------------------------------------ mode


def test_mode_resolution(tmp_path, monkeypatch):
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("online") == "online"  # an explicit request wins
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto") == "offline"

    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode(None) == "offline"  # no credentials
    netrc_file.write_text("machine example.org login u password p\n")
    assert resolve_mode(None) == "offline"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert resolve_mode(None) == "online"
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_mode(None) == "online"

    with pytest.raises(ValueError, match="'sometimes'.*online, offline, disabled"):
        resolve_mode("sometimes")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match="WANDB_MODE='bogus'"):
        resolve_mode(None)


# ------------------------------------------------------------------ real offline run


def test_offline_run_is_logged_and_readable_by_wandb(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    config = {"model": {"backbone": "resnet18"}, "train": {"lr": 0.001, "epochs": 2}}
    image = gray_image()
    heatmap = np.zeros((12, 16), np.float32)
    heatmap[3, 12] = 1.0  # hot spot in the top-right of the image
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")

    with Tracker(run_dir, project="pylon-test", run_name="demo", config=config) as tracker:
        assert tracker.mode == "offline" and tracker.active
        tracker.log_step(1, **{"train/loss": 0.75, "lr": 0.001})
        tracker.log_step(2, **{"train/loss": 0.5, "lr": 0.001})
        tracker.log_epoch(0, {"train": {"loss": 0.6}, "val": {"loss": 0.55, "auroc": 0.7}})
        tracker.log_images(
            "val/examples",
            [(image, heatmap, [(10, 5, 20, 15)], "patient 1"), (image, None, [], "patient 2")],
            step=2,
        )
        with pytest.raises(ValueError, match="uint8"):
            tracker.log_images("bad", [(image.astype(np.float32), None, [], "x")])
        tracker.log_table("val/predictions", pd.DataFrame({"id": ["a", "b"], "prob": [0.25, 0.75]}))
        assert tracker.log_artifact(checkpoint, "demo best") is False  # offline: no upload
        tracker.summary(best_val_loss=0.55, best_epoch=0)
    assert not tracker.active and tracker.disabled_reason is None
    wandb_dir = tracker.wandb_dir
    assert tracker.run_id and wandb_dir.name.endswith(tracker.run_id)

    assert wandb_dir is not None and wandb_dir.parent == run_dir / "wandb"
    records = read_wandb_records(wandb_dir)
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["project"] == "pylon-test" and run_record["display_name"] == "demo"
    assert run_record["config"]["update"]["model"] == {"backbone": "resnet18"}

    rows = history_rows(records)
    steps = [row for row in rows if "lr" in row]
    assert [(r["global_step"], r["train/loss"], r["lr"]) for r in steps] == [
        (1, 0.75, 0.001),
        (2, 0.5, 0.001),
    ]
    epoch_row = next(row for row in rows if "val/loss" in row)
    assert (epoch_row["epoch"], epoch_row["val/auroc"], epoch_row["global_step"]) == (0, 0.7, 2)
    assert epoch_row["train/loss"] == 0.6

    image_row = next(row for row in rows if any(k.startswith("val/examples.") for k in row))
    assert image_row["val/examples._type"] == "images/separated"
    assert image_row["val/examples.count"] == 2
    assert image_row["val/examples.captions"] == ["patient 1", "patient 2"]
    assert image_row["global_step"] == 2
    assert not any(k.startswith("bad") for row in rows for k in row)

    table_row = next(row for row in rows if "val/predictions._type" in row)
    assert table_row["val/predictions._type"] == "table-file"
    assert table_row["val/predictions.nrows"] == 2
    assert not any(r["type"] == "artifact" and r["artifact"]["type"] == "model" for r in records)

    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary["best_val_loss"] == 0.55 and summary["best_epoch"] == 0
    assert any(r["type"] == "exit" and r["exit"]["exit_code"] == 0 for r in records)

    # Follow the record's pointers to the media wandb wrote: pixel boxes, colour overlay.
    files = wandb_dir / "files"
    first_boxes, second_boxes = image_row["val/examples.all_boxes"]
    assert second_boxes is None  # the second example had no boxes
    boxes = json.loads((files / first_boxes["ground_truth"]["path"]).read_text())
    assert boxes["box_data"] == [
        {
            "position": {"minX": 10.0, "maxX": 30.0, "minY": 5.0, "maxY": 20.0},
            "domain": "pixel",
            "class_id": 1,
            "box_caption": "pneumonia",
        }
    ]
    assert boxes["class_labels"] == {"1": "pneumonia"}
    overlaid, plain = (
        np.asarray(Image.open(files / name)) for name in image_row["val/examples.filenames"]
    )
    assert overlaid.shape == (48, 64, 3) and plain.shape == (48, 64)
    np.testing.assert_array_equal(plain, image)
    red_minus_blue = overlaid[..., 0].astype(int) - overlaid[..., 2].astype(int)
    hot_y, hot_x = np.unravel_index(np.argmax(red_minus_blue), red_minus_blue.shape)
    assert hot_y < 24 and hot_x > 32  # the heatmap's hot spot shows top-right
    table = json.loads((files / table_row["val/predictions.path"]).read_text())
    assert table["columns"] == ["id", "prob"] and table["data"] == [["a", 0.25], ["b", 0.75]]

    history = read_history(run_dir)
    assert history.to_dict("records") == [
        {"epoch": 0, "train/loss": 0.6, "val/loss": 0.55, "val/auroc": 0.7}
    ]


def test_wandb_failure_mid_run_switches_off_once_and_history_continues(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, project="pylon-test", run_name="fails", config={}, mode="offline")
    assert tracker.active
    tracker.log_step(1, loss=1.0)
    tracker.wandb_run.finish()  # the run ends under us, as when the wandb service dies

    expected = r"W&B tracking switched off \(log_step failed: UsageError"
    with pytest.warns(RuntimeWarning, match=expected):
        tracker.log_step(2, loss=0.5)
    assert not tracker.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, nothing raised
        tracker.log_epoch(0, {"val/loss": 0.4})
        tracker.log_images("ex", [(gray_image(), None, [(1, 2, 3, 4)], "c")], step=3)
        tracker.summary(best=0.4)
        tracker.finish()
    assert read_history(run_dir)["val/loss"].tolist() == [0.4]

    # Resuming the run later continues the same W&B run and the same history.
    first_id = tracker.run_id
    assert latest_wandb_run_id(run_dir) == first_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = Tracker(run_dir, project="pylon-test", run_name="fails", config={},
                          mode="offline", resume=True)
        assert resumed.active and resumed.run_id == first_id
        resumed.log_epoch(1, {"val/loss": 0.3}, step=4)
        resumed.finish()
    assert read_history(run_dir)["val/loss"].tolist() == [0.4, 0.3]
    rows = history_rows(read_wandb_records(resumed.wandb_dir))
    assert [(r["epoch"], r["val/loss"], r["global_step"]) for r in rows] == [(1, 0.3, 4)]


# ------------------------------------------------------------------ no W&B run


def test_init_failure_keeps_training_with_history_only(tmp_path):
    run_dir = tmp_path / "run"
    expected = r"wandb.init failed: UsageError: Invalid project name"
    with pytest.warns(RuntimeWarning, match=expected) as caught:
        tracker = Tracker(run_dir, project="bad/name", run_name="x", config={}, mode="offline")
    assert len(caught) == 1
    assert not tracker.active and "Invalid project name" in tracker.disabled_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.log_step(1, loss=0.3)
        tracker.log_epoch(1, {"loss": 0.3})
        tracker.log_table("t", pd.DataFrame({"a": [1]}))
        tracker.finish()
    assert read_history(run_dir).to_dict("records") == [{"epoch": 1, "loss": 0.3}]


def test_disabled_mode_writes_only_history_with_stable_columns(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, project="p", run_name="r", config={}, mode="disabled")
    assert tracker.mode == "disabled" and not tracker.active and tracker.wandb_dir is None
    tracker.log_step(10, loss=1.0)
    tracker.log_epoch(0, {"train/loss": 0.9, "val/loss": 1.0})
    tracker.log_epoch(1, {"train/loss": 0.7, "val/loss": 0.8})
    appended = (run_dir / HISTORY_FILE).read_text()
    assert appended.splitlines()[0] == "epoch,train/loss,val/loss"
    # a metric that first appears at epoch 2: the file is rewritten with all columns
    tracker.log_epoch(2, {"train/loss": 0.6, "val/loss": 0.7, "val/auroc": 0.81, "lr": 2e-5})
    tracker.log_epoch(3, {"val/loss": 0.65})
    tracker.finish()
    assert sorted(p.name for p in run_dir.iterdir()) == [HISTORY_FILE]
    assert latest_wandb_run_id(run_dir) is None

    lines = (run_dir / HISTORY_FILE).read_text().splitlines()
    assert lines[0] == "epoch,train/loss,val/loss,val/auroc,lr"
    assert lines[1:3] == ["0,0.9,1.0,,", "1,0.7,0.8,,"]
    history = read_history(run_dir)
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["val/auroc"].isna().tolist() == [True, True, False, True]
    assert history.loc[2, "lr"] == 2e-5 and history.loc[3, "val/loss"] == 0.65

    # a resumed run repeats epoch 2: its row is replaced and the later one dropped
    resumed = Tracker(run_dir, project="p", run_name="r", config={}, mode="disabled")
    resumed.log_epoch(2, {"val/loss": 0.5})
    history = read_history(run_dir)
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["val/loss"].tolist() == [1.0, 0.8, 0.5]
    assert list(history.columns) == ["epoch", "train/loss", "val/loss", "val/auroc", "lr"]

    with pytest.raises(FileNotFoundError, match="no training history"):
        read_history(tmp_path / "elsewhere")


def test_non_zero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, project="p", run_name="r", config={}, mode="offline", rank=1)
    assert tracker.mode == "disabled" and not tracker.active
    tracker.log_step(1, loss=1.0)
    tracker.log_epoch(0, {"loss": 1.0})
    tracker.log_images("ex", [(gray_image(), None, [], "c")], step=1)
    tracker.log_table("t", pd.DataFrame({"a": [1]}))
    tracker.summary(best=1.0)
    assert tracker.log_artifact(tmp_path / "x.pt", "best") is False
    tracker.finish()
    assert not run_dir.exists()


def test_logged_overlay_resizes_and_marks_the_hot_spot():
    image = np.full((40, 60), 128, np.uint8)
    heatmap = np.zeros((10, 15), np.float32)
    heatmap[2, 11] = 5.0
    labels = {1: "pneumonia"}
    overlay, _ = _prepare_image((image, heatmap, [], "c"), labels, alpha=0.5, cmap="jet")
    assert overlay.shape == (40, 60, 3) and overlay.dtype == np.uint8
    red_minus_blue = overlay[..., 0].astype(int) - overlay[..., 2].astype(int)
    hot_y, hot_x = np.unravel_index(np.argmax(red_minus_blue), red_minus_blue.shape)
    assert abs(hot_y - 9.5) <= 3 and abs(hot_x - 46.5) <= 3  # centre of cell (2, 11) x4
    assert (overlay[35, 5] == 128).all()  # cold regions show the plain radiograph
    ready = np.zeros((20, 30, 3), np.uint8)
    assert _prepare_image((image, ready, [], "c"), labels, 0.5, "jet")[0] is ready
    with pytest.raises(ValueError, match="heatmap must be 2-D"):
        _prepare_image((image, np.zeros((2, 3, 4), np.float32), [], "c"), labels, 0.5, "jet")

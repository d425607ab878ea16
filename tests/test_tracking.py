"""Tracking: real offline W&B runs read back with wandb's own reader, and history.csv."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import read_wandb_records
from pylon.tracking import Tracker


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """No credentials, no network, wandb's caches inside the test folder."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    import wandb

    wandb.teardown()  # wandb keeps process-wide settings (an API key a test set) until torn down
    yield
    wandb.teardown()


def logging_cfg(mode: str = "offline") -> SimpleNamespace:
    return SimpleNamespace(wandb_mode=mode, project="pylon-test", entity=None, group=None)


def history_rows(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_offline_run_is_logged_and_readable_by_wandb(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    tracker = Tracker(run_dir, logging_cfg(), config={"train": {"lr": 0.001}})
    assert tracker.mode == "offline" and tracker.id and tracker.dir.parent == run_dir / "wandb"
    tracker.log({"train/loss": 0.75, "train/lr": 0.001}, step=1)
    tracker.log_epoch(1, {"train_loss": 0.6, "val_loss": 0.55}, step=2)
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:, 0] = 255
    tracker.log_images("val/heatmaps", [(image, "patient 1"), (image, "patient 2")], step=2)
    tracker.log_table("eval/per_image", pd.DataFrame({"id": ["a", "b"], "prob": [0.25, 0.75]}))
    tracker.summary({"eval": {"auroc": 0.9, "ci": {"auroc": [0.8, 0.95]}}})
    tracker.log_artifact(tmp_path / "missing.pt", "best")  # offline: not uploaded, no error
    tracker.finish()
    assert "wandb sync" in tracker.note

    records = read_wandb_records(tracker.dir)
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["display_name"] == "demo" and run_record["config"]["update"]["train"] == {"lr": 0.001}
    rows = history_rows(records)
    assert [(r["global_step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(1, 0.75)]
    epoch_row = next(r for r in rows if "val_loss" in r)
    assert (epoch_row["epoch"], epoch_row["val_loss"], epoch_row["global_step"]) == (1, 0.55, 2)
    image_row = next(r for r in rows if "val/heatmaps._type" in r)
    assert image_row["val/heatmaps.count"] == 2 and image_row["val/heatmaps.captions"] == ["patient 1", "patient 2"]
    first = np.asarray(Image.open(tracker.dir / "files" / image_row["val/heatmaps.filenames"][0]))
    np.testing.assert_array_equal(first, image)
    table_row = next(r for r in rows if "eval/per_image._type" in r)
    table = json.loads((tracker.dir / "files" / table_row["eval/per_image.path"]).read_text())
    assert table["data"] == [["a", 0.25], ["b", 0.75]]
    summary = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"].get("update", {}).items()}
    assert summary["eval/auroc"] == 0.9 and (summary["eval/ci/auroc_low"], summary["eval/ci/auroc_high"]) == (0.8, 0.95)

    # A resumed run continues the same W&B run, given its stored id.
    again = Tracker(run_dir, logging_cfg(), run_id=tracker.id, job_type="eval")
    assert again.id == tracker.id
    again.finish()


def test_summary_val_loss_is_the_best_epochs(tmp_path):
    # What a W&B sweep ranks runs by, and what best.pt was selected on: not the last epoch's.
    tracker = Tracker(tmp_path, logging_cfg(), config={})
    for epoch, loss in enumerate((0.55, 0.7), start=1):
        tracker.log_epoch(epoch, {"val_loss": loss}, step=epoch)
    tracker.finish()
    updates = [r["summary"]["update"] for r in read_wandb_records(tracker.dir) if r["type"] == "summary"]
    assert [u["val_loss"] for u in updates if "val_loss" in u][-1] == {"min": 0.55}


def test_history_replaces_repeated_epochs_and_keeps_new_columns(tmp_path):
    tracker = Tracker(tmp_path, logging_cfg("disabled"))
    assert tracker.run is None and tracker.note == "W&B disabled"
    for epoch, loss in ((1, 0.9), (2, 0.8), (3, 0.7)):
        tracker.log_epoch(epoch, {"val_loss": loss}, step=epoch)
    tracker.log_epoch(2, {"val_loss": 0.5, "val_auroc": 0.6}, step=2)  # a resumed run repeats epoch 2
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["val_loss"].tolist() == [0.9, 0.5]
    assert history["val_auroc"].isna().tolist() == [True, False]


def test_online_without_credentials_falls_back_to_offline(tmp_path, capsys, monkeypatch):
    tracker = Tracker(tmp_path / "no-key", logging_cfg("online"))
    assert tracker.mode == "offline" and tracker.run is not None
    assert "logging offline instead" in capsys.readouterr().out
    tracker.finish()
    tracker = Tracker(tmp_path / "auto-no-key", logging_cfg("auto"))  # no login: offline, nothing to say
    assert tracker.mode == "offline" and capsys.readouterr().out == ""
    tracker.finish()


def test_credentials_but_no_server_fall_back_to_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    tracker = Tracker(tmp_path / "no-network", logging_cfg("auto"))
    assert tracker.mode == "offline" and "wandb sync" in tracker.note
    assert "W&B could not start online within 3 s (" in capsys.readouterr().out
    tracker.finish()


def test_no_server_is_decided_within_the_trackers_own_timeout_not_wandbs_90_s(tmp_path, capsys, monkeypatch):
    import time

    from pylon import tracking

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    monkeypatch.setattr(tracking, "ONLINE_INIT_TIMEOUT_S", 2)  # 15 s in use: the test stands in for it
    started = time.monotonic()
    tracker = Tracker(tmp_path / "no-network", logging_cfg("online"))
    assert time.monotonic() - started < 45  # wandb's own default waits 90 s
    assert tracker.mode == "offline"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "W&B could not start online within 2 s (" in out and "logging offline instead" in out
    tracker.finish()


def test_the_wandb_sync_hint_quotes_a_path_with_spaces(tmp_path):
    import shlex

    tracker = Tracker(tmp_path / "my runs" / "demo", logging_cfg())
    tracker.finish()
    assert f"(upload: wandb sync {shlex.quote(str(tracker.dir))})" in tracker.note and " '" in tracker.note


def test_a_wandb_failure_mid_run_switches_tracking_off_and_history_goes_on(tmp_path, caplog):
    tracker = Tracker(tmp_path, logging_cfg())
    tracker.log_images("bad", [(np.zeros((4, 4, 7)), "seven channels")])  # wandb refuses the image
    assert tracker.run is None and "switched off" in caplog.text
    tracker.log_epoch(1, {"val_loss": 0.5}, step=1)
    tracker.finish()
    assert pd.read_csv(tmp_path / "history.csv")["val_loss"].tolist() == [0.5]


def test_only_the_main_process_tracks(tmp_path):
    tracker = Tracker(tmp_path, logging_cfg(), enabled=False)
    assert tracker.run is None and not (tmp_path / "wandb").exists()


def test_a_misspelt_wandb_mode_is_named_and_the_run_goes_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "onlin")
    tracker = Tracker(tmp_path, logging_cfg("auto"))
    assert tracker.mode == "offline"
    out = capsys.readouterr().out
    assert "could not start online" in out and "mode" in out and "'onlin'" in out
    tracker.finish()

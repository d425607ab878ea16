"""tools/lr_find.py on the tiny generated data set: the files it writes, the geometric schedule,
the suggestion, stopping on divergence, and a user mistake as one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import load_script, run_folders, tiny_overrides
from pylon.config import load_config
from pylon.data.pipeline import prepare_data

lr_find = load_script("tools/lr_find")


def range_test(tiny_data: Path, runs: Path, *args: str, batch_size: int = 2) -> tuple[Path, pd.DataFrame, dict]:
    overrides = tiny_overrides(tiny_data, runs, f"train.batch_size={batch_size}")
    assert lr_find.main(["--config", "demo.yaml", *args, "--set", *overrides]) == 0
    (run,) = run_folders(runs)
    assert run.name.startswith("demo-lrfind-")
    return run, pd.read_csv(run / "lr_find.csv"), json.loads((run / "lr_find.json").read_text())


def test_range_test_files_schedule_and_suggestion(tiny_data, tmp_path, capsys):
    run, table, result = range_test(tiny_data, tmp_path / "runs", "--start", "1e-5", "--end", "1e-2",
                                    "--steps", "8")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "lr_find.csv", "lr_find.json", "lr_find.png"]
    assert (run / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(table.columns) == ["step", "lr", "loss", "smoothed"]
    assert set(result) == {"suggested_lr", "config_lr", "min_loss_lr", "steps", "diverged"}
    assert result["steps"] == len(table) == 8 and result["diverged"] is False
    assert table["step"].tolist() == list(range(1, 9))
    assert np.allclose(table["lr"], 1e-5 * 1000 ** (np.arange(8) / 7), rtol=1e-12)  # 1e-5 to 1e-2, geometric
    assert np.isfinite(table[["loss", "smoothed"]].to_numpy()).all()
    # The smoothed loss is the bias-corrected moving average of the batch losses.
    weights = 0.98 ** np.arange(7, -1, -1) * 0.02
    assert table["smoothed"].iloc[-1] == pytest.approx((weights * table["loss"]).sum() / (1 - 0.98 ** 8))
    assert 1e-5 <= result["suggested_lr"] <= 1e-2 and result["suggested_lr"] in table["lr"].tolist()
    assert result["min_loss_lr"] == table["lr"][table["smoothed"].idxmin()]
    assert result["config_lr"] == 1e-3  # demo.yaml's
    cfg = load_config(run / "config.yaml")
    assert cfg.train.batch_size == 2 and Path(cfg.data.roots.kaggle).is_absolute()
    out = capsys.readouterr().out
    assert f"suggested lr: {result['suggested_lr']:.3g}" in out and str(run / "lr_find.csv") in out


def test_huge_end_stops_early_and_still_writes(tiny_data, tmp_path):
    run, table, result = range_test(tiny_data, tmp_path / "runs", "--start", "1e-4", "--end", "1e8")
    cfg = load_config(run / "config.yaml")
    steps_per_epoch = len(prepare_data(cfg.data, progress=False).rows["train"]) // 2  # batch 2, last one dropped
    # Without --steps an epoch this short is stretched to 100 steps, and the test stopped before their end.
    assert steps_per_epoch < lr_find.MIN_STEPS
    assert np.allclose(table["lr"], 1e-4 * 1e12 ** (np.arange(len(table)) / (lr_find.MIN_STEPS - 1)), rtol=1e-12)
    assert result["diverged"] is True and result["steps"] == len(table) < lr_find.MIN_STEPS
    assert {p.name for p in run.iterdir()} == {"config.yaml", "lr_find.csv", "lr_find.json", "lr_find.png"}
    assert not list(tmp_path.rglob("*.pt"))  # no checkpoint anywhere
    # The suggestion comes from before the stop: never the point that blew up.
    assert 1e-4 <= result["suggested_lr"] < table["lr"].iloc[-1]


def test_a_test_longer_than_an_epoch_goes_on_into_the_next(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    cfg = load_config("demo.yaml", tiny_overrides(tiny_data, runs, "train.batch_size=2"))
    steps_per_epoch = len(prepare_data(cfg.data, progress=False).rows["train"]) // 2
    run, table, result = range_test(tiny_data, runs, "--start", "1e-6", "--end", "1e-5",
                                    "--steps", str(2 * steps_per_epoch + 3))
    assert result["steps"] == len(table) == 2 * steps_per_epoch + 3 and result["diverged"] is False


def test_a_blown_up_loss_ends_the_test_instead_of_raising(tiny_data, tmp_path):
    # Step 2 runs at lr 1e3: the loss of step 3 is astronomical and the engine's divergence
    # check fires before step 3 is recorded.
    run, table, result = range_test(tiny_data, tmp_path / "runs", "--start", "1e-7", "--end", "1e13",
                                    "--steps", "3")
    assert result["diverged"] is True and result["steps"] == len(table) == 2
    assert result["suggested_lr"] in table["lr"].tolist()


def test_start_not_below_end_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        lr_find.cli.run(lr_find.main, ["--config", "demo.yaml", "--start", "1", "--end", "0.1",
                                       "--set", f"logging.runs_dir={tmp_path}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --start must be positive and below --end") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_under_torchrun_it_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        lr_find.cli.run(lr_find.main, ["--config", "demo.yaml", "--set", f"logging.runs_dir={tmp_path}"])
    assert stop.value.code == 2 and "start it with python, not torchrun" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

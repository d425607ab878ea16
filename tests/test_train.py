"""train.py end to end on a tiny generated data set: the run folder contract, exact resume and
reproducibility, W&B records, stop rules, encoder freezing, and user mistakes on the command line.

Runs that only need the Python API go through ``train.main`` in this process (seconds);
anything about exit codes and what the user sees runs the real command in a subprocess.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TRAIN_PY, read_wandb_records, run_folders, tiny_overrides, train_cli
from pylon.checkpoint import CheckpointError, load_checkpoint, load_weights
from pylon.config import ConfigError, load_config, to_dict
from pylon.data.pipeline import prepare_data
from pylon.device import choose_precision, seed_everything
from pylon.models import build_model
from pylon.optim import build_optimizer, build_scheduler
from pylon.runs import RunPaths
from pylon.trainstate import TrainingDiverged

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auroc", "val_accuracy", "val_sensitivity",
                   "val_specificity", "lr"]


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train_cli_under_test", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_module = _load_train_module()


def train(*argv: str) -> int:
    """train.py's main() in this process."""
    return train_module.main(list(argv))


def only_run(runs_dir: Path) -> RunPaths:
    (root,) = run_folders(runs_dir)
    return RunPaths(root)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_run(run: Path, dest: Path) -> RunPaths:
    return RunPaths(Path(shutil.copytree(run, dest / run.name)))


def n_train_images(tiny_data: Path, tmp_path: Path) -> int:
    cfg = load_config("demo.yaml", tiny_overrides(tiny_data, tmp_path))
    return len(prepare_data(cfg.data, progress=False).rows["train"])


def error_lines(stderr: str) -> list[str]:
    """What stays visible on a terminal: progress bars redraw with \r and ANSI cursor moves."""
    visible = (re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.split("\r")[-1]).strip() for line in stderr.split("\n"))
    return [line for line in visible if line]


# ---------------------------------------------------------------------------------------------
# The run folder


def test_run_folder_follows_the_contract(tiny_run, tiny_data, tmp_path):
    run = RunPaths(tiny_run)
    for path in (run.config, run.best, run.last, run.history):
        assert path.is_file(), f"{path} missing"

    # config.yaml: fully resolved (no 'extends'), loads back to the config the run used.
    assert "extends" not in run.config.read_text()
    cfg = load_config(run.config)
    last = load_checkpoint(run.last)
    assert to_dict(cfg) == last["config"]
    assert (cfg.name, cfg.model.backbone, cfg.data.image_size, cfg.train.epochs) == ("demo", "resnet18", 64, 2)

    # history.csv: one row per epoch with the documented columns.
    history = pd.read_csv(run.history)
    assert list(history.columns[: len(HISTORY_COLUMNS)]) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2]
    assert history[["train_loss", "val_loss", "lr"]].notna().all().all()

    # best.pt: the epoch with the lowest val loss; loads strictly into the configured model.
    best = load_checkpoint(run.best)
    lowest = history.loc[history["val_loss"].idxmin()]
    assert best["epoch"] == int(lowest["epoch"])
    assert best["val_loss"] == pytest.approx(lowest["val_loss"], rel=1e-12)
    n_val = len(prepare_data(cfg.data, progress=False).rows["val"])
    assert best["val_metrics"]["n"] == n_val  # every val image once, none padded
    assert best["normalization"] == {"mean": pytest.approx(cfg.data.mean), "std": pytest.approx(cfg.data.std)}
    load_weights(build_model(cfg.model), best["model"], str(run.best))

    # last.pt: the whole resume state after the final epoch, in one dict.
    model = load_weights(build_model(cfg.model), last["model"], str(run.last))
    optimizer = build_optimizer(model, cfg.train)
    optimizer.load_state_dict(last["optimizer"])
    build_scheduler(optimizer, cfg.train).load_state_dict(last["scheduler"])
    assert last["wandb_run_id"] == best["wandb_run_id"] and last["wandb_run_id"]
    loop = last["loop"]
    steps_per_epoch = n_train_images(tiny_data, tmp_path) // cfg.train.batch_size
    assert loop["epoch"] == 2 and loop["global_step"] == 2 * steps_per_epoch
    assert loop["stop_reason"] == "all epochs done"
    assert loop["best_epoch"] == best["epoch"]


def test_final_summary_names_best_epoch_and_paths(tiny_run):
    stdout = (tiny_run.parent.parent / "train_stdout.txt").read_text().splitlines()
    summary = json.loads(stdout[-1])
    history = pd.read_csv(RunPaths(tiny_run).history)
    assert summary["best_epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert summary["best_val_loss"] == pytest.approx(history["val_loss"].min(), rel=1e-12)
    assert {"best_val_auroc", "best_val_accuracy", "best_checkpoint", "last_checkpoint", "history"} <= set(summary)
    assert not {k for k in summary if k.split("_")[-1] in ("tp", "fp", "tn", "fn", "note", "threshold")}
    for key in ("best_checkpoint", "last_checkpoint", "history"):
        assert Path(summary[key]).exists(), key
    (wandb_dir,) = (tiny_run / "wandb").glob("offline-run-*")
    assert summary["wandb"].startswith("W&B offline") and str(wandb_dir) in summary["wandb"]
    text = "\n".join(stdout)
    assert f"best epoch {summary['best_epoch']} of 2" in text
    assert f"wandb sync {wandb_dir}" in text  # offline: how to upload it later


def test_run_records_the_precision_it_trained_at(tiny_run):
    """Printed at the start, in the summary, in both checkpoints and in the W&B config."""
    expected = choose_precision(torch.device("cpu"), load_config(RunPaths(tiny_run).config).train).name
    stdout = (tiny_run.parent.parent / "train_stdout.txt").read_text().splitlines()
    assert any(line.startswith(f"compute: {expected} on cpu (") for line in stdout)
    assert json.loads(stdout[-1])["precision"] == expected
    assert load_checkpoint(RunPaths(tiny_run).best)["precision"] == expected
    assert load_checkpoint(RunPaths(tiny_run).last)["precision"] == expected
    (wandb_dir,) = (tiny_run / "wandb").glob("offline-run-*")
    (start,) = [r for r in read_wandb_records(wandb_dir) if r["type"] == "run"]
    assert start["run"]["config"]["update"]["precision"] == expected


def test_wandb_offline_run_holds_the_logged_keys(tiny_run, tiny_data, tmp_path):
    (wandb_dir,) = (tiny_run / "wandb").glob("offline-run-*")
    rows = [r["history"]["item"] for r in read_wandb_records(wandb_dir) if r["type"] == "history"]
    steps = n_train_images(tiny_data, tmp_path) // 8

    per_step = [r for r in rows if "train/loss" in r]
    assert [int(r["global_step"]) for r in per_step] == list(range(1, 2 * steps + 1))  # log_every_steps=1
    assert all(math.isfinite(float(r["train/loss"])) and float(r["train/lr"]) > 0 for r in per_step)

    history = pd.read_csv(RunPaths(tiny_run).history)
    per_epoch = [r for r in rows if "val_loss" in r]
    assert [int(r["epoch"]) for r in per_epoch] == [1, 2]
    for row, (_, expected) in zip(per_epoch, history.iterrows()):
        assert float(row["val_loss"]) == pytest.approx(expected["val_loss"])
        assert {"val_auroc", "val_accuracy", "val_sensitivity", "val_specificity", "lr"} <= set(row)
    # Plotted at the step the epoch ended on, not at the last per-step log.
    assert [int(r["global_step"]) for r in per_epoch] == [steps, 2 * steps]

    images = [r for r in rows if "val/heatmaps._type" in r]
    n_val = len(prepare_data(load_config(RunPaths(tiny_run).config).data, progress=False).rows["val"])
    assert len(images) == 2 and all(int(r["val/heatmaps.count"]) == min(4, n_val) for r in images)


# ---------------------------------------------------------------------------------------------
# Exact resume and reproducibility


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_and_repeated_run_match_uninterrupted_run(tiny_data, tmp_path, workers):
    def runs_dir(name: str) -> Path:
        return tmp_path / name

    def overrides(name: str, *extra: str) -> list[str]:
        return tiny_overrides(tiny_data, runs_dir(name), f"data.num_workers={workers}", *extra)

    assert train("--config", "demo.yaml", "--set", *overrides("straight")) == 0
    assert train("--config", "demo.yaml", "--set", *overrides("again")) == 0
    assert train("--config", "demo.yaml", "--set", *overrides("resumed", "train.epochs=1")) == 0
    resumed = only_run(runs_dir("resumed"))
    assert load_checkpoint(resumed.last)["loop"]["epoch"] == 1
    assert train("--resume", str(resumed.root), "--set", "train.epochs=2") == 0

    straight, again = only_run(runs_dir("straight")), only_run(runs_dir("again"))
    for other in (again, resumed):
        a, b = load_checkpoint(straight.last), load_checkpoint(other.last)
        assert_same_tensors(a["model"], b["model"])
        assert a["loop"] == b["loop"]
        assert_same_tensors(weights(straight.best), weights(other.best))
        pd.testing.assert_frame_equal(
            pd.read_csv(straight.history)[HISTORY_COLUMNS], pd.read_csv(other.history)[HISTORY_COLUMNS]
        )
    # The comparison means something only if training moved the weights.
    cfg = load_config(straight.config)
    seed_everything(cfg.train.seed)
    initial = build_model(cfg.model).state_dict()
    assert not torch.equal(initial["encoder.conv1.weight"], weights(straight.last)["encoder.conv1.weight"])


def test_resume_without_argument_takes_the_latest_run_and_extends_it(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --resume with no folder looks in ./runs
    overrides = tiny_overrides(tiny_data, Path("runs"), "train.epochs=1")
    assert train("--config", "demo.yaml", "--set", *overrides) == 0
    older = only_run(Path("runs"))
    older_last = sha256(older.last)
    assert train("--config", "demo.yaml", "--set", *overrides, "train.seed=1") == 0
    (newer,) = [RunPaths(p.resolve()) for p in run_folders(Path("runs")) if p != older.root]
    crashed = Path("runs/crashed-20990101-000000")  # the newest folder, but a failed start: no checkpoint
    crashed.mkdir()
    (crashed / "config.yaml").write_text("name: crashed\n")

    assert train("--resume", "--set", "train.epochs=2") == 0
    assert load_checkpoint(newer.last)["loop"]["epoch"] == 2
    assert len(pd.read_csv(newer.history)) == 2
    assert load_config(newer.config).train.epochs == 2
    assert sha256(older.last) == older_last
    assert len(run_folders(Path("runs"))) == 3  # resumed in place, no new folder

    # Asking again for the same number of epochs: nothing to do, and it says why; the runs
    # folder given with --set is the one searched.
    capsys.readouterr()
    newer_last = sha256(newer.last)
    monkeypatch.chdir(tmp_path.parent)
    assert train("--resume", "--set", f"logging.runs_dir={tmp_path / 'runs'}") == 0
    assert "has completed 2 epochs" in capsys.readouterr().out
    assert sha256(newer.last) == newer_last


# ---------------------------------------------------------------------------------------------
# Stop rules and encoder freezing


def test_early_stopping_ends_the_run_and_cannot_be_extended(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train("--config", "demo.yaml", "--set",
                 *tiny_overrides(tiny_data, runs, "train.epochs=8", "train.early_stop_patience=1")) == 0
    run = only_run(runs)
    val_loss = pd.read_csv(run.history)["val_loss"].tolist()
    # Patience 1: every epoch but the last improved, the last did not, and it stopped there.
    assert len(val_loss) < 8
    assert all(b < a for a, b in zip(val_loss, val_loss[1:-1]))
    assert val_loss[-1] >= min(val_loss[:-1])
    loop = load_checkpoint(run.last)["loop"]
    assert loop["epoch"] == len(val_loss)
    assert loop["stop_reason"] == "early stop: no val-loss improvement for 1 epochs"

    capsys.readouterr()
    before = sha256(run.last)
    assert train("--resume", str(run.root), "--set", "train.epochs=20") == 0
    assert "stopped early (early stop" in capsys.readouterr().out
    assert sha256(run.last) == before and len(pd.read_csv(run.history)) == len(val_loss)


def test_learning_rate_below_min_lr_ends_the_run(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    extra = ("train.epochs=8", "train.plateau_patience=0", "train.plateau_factor=0.1", "train.min_lr=5e-4")
    assert train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, *extra)) == 0
    run = only_run(runs)
    history = pd.read_csv(run.history)
    last = load_checkpoint(run.last)
    # Patience 0: the first epoch without improvement cuts lr 1e-3 -> 1e-4 < min_lr: stop.
    assert len(history) < 8 and (history["lr"] == 1e-3).all()
    assert history["val_loss"].iloc[-1] >= history["val_loss"].iloc[:-1].min()
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert last["loop"]["stop_reason"] == "learning rate 1.0e-04 fell below train.min_lr=5.0e-04"


def test_freeze_encoder_epochs_keeps_encoder_fixed_then_trains_it(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    overrides = tiny_overrides(tiny_data, runs, "train.freeze_encoder_epochs=1", "train.epochs=1")
    assert train("--config", "demo.yaml", "--set", *overrides) == 0
    run = only_run(runs)
    cfg = load_config(run.config)
    seed_everything(cfg.train.seed)  # the engine builds the model right after seeding
    initial = build_model(cfg.model).state_dict()
    encoder = [k for k in initial if k.startswith("encoder.")]
    rest = [k for k in initial if not k.startswith("encoder.") and initial[k].is_floating_point()]

    stage_one = weights(run.last)
    assert_same_tensors({k: initial[k] for k in encoder}, {k: stage_one[k] for k in encoder})  # BN stats too
    assert any(not torch.equal(initial[k], stage_one[k]) for k in rest)

    assert train("--resume", str(run.root), "--set", "train.epochs=2") == 0
    stage_two = weights(run.last)
    changed = [k for k in encoder if not torch.equal(stage_one[k], stage_two[k])]
    assert "encoder.conv1.weight" in changed and "encoder.layer3.1.bn2.running_mean" in changed  # the deepest stage the demo runs
    lr = pd.read_csv(run.history)["lr"].tolist()
    assert lr == pytest.approx([1e-3, 1e-3 * cfg.train.finetune_lr_factor])


# ---------------------------------------------------------------------------------------------
# What the user sees when something is wrong (real command, subprocess)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "nope.yaml"], "error: config file not found: nope.yaml"),
        (["--config", "demo.yaml", "--set", "train.epoch=1"], "error: --set: unknown key 'train.epoch'"),
    ],
)
def test_config_mistakes_exit_2_with_one_line(tmp_path, args, message):
    done = train_cli(args, cwd=tmp_path)
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith(message)


def test_paper_config_fails_fast_without_weights_or_data(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    done = train_cli(["--config", "pylon_r50.yaml"], cwd=tmp_path, env=offline)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("error: cannot get the ImageNet weights of resnet50") and "model.weights=null" in line
    assert "HF_HUB_OFFLINE=1" in line  # how to work offline
    # Before any data work: no cache, no run folder.
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "runs").exists()

    # (resnet18 only to build faster: the data check does not depend on the model)
    done = train_cli(["--config", "pylon_r50.yaml", "--set", "model.weights=null", "model.backbone=resnet18"],
                     cwd=tmp_path, env=offline)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert "data.roots.kaggle" in line and "datasets/README.md" in line
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_unsafe_and_damaged_checkpoints(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    config_before = run.config.read_text()
    good = load_checkpoint(run.last)
    # A checkpoint that would run code when unpickled (argparse.Namespace stands in for any class).
    torch.save({**good, "extra": argparse.Namespace(payload="anything")}, run.last)
    done = train_cli(["--resume", str(run.root)], cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last_line = error_lines(done.stderr)[-1]
    assert last_line.startswith(f"error: {run.last}: refused, it holds Python code (argparse.Namespace)")
    assert "weights_only" not in done.stderr  # never torch's advice to load it unsafely

    run.last.write_bytes((tiny_run / "checkpoints" / "last.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        train("--resume", str(run.root))
    assert run.config.read_text() == config_before  # a refused resume changes nothing
    assert not (run.root / "eval").exists() and len(pd.read_csv(run.history)) == 2


def test_nan_loss_or_a_loss_explosion_stops_cleanly_and_keeps_the_last_good_checkpoint(tiny_run, tiny_data, tmp_path):
    # A learning rate this large blows the weights up after one step: the next loss is NaN.
    with pytest.raises(TrainingDiverged, match=r"training \(epoch 1, step 2\) loss became nan.*none yet.*train\.lr"):
        train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, tmp_path / "runs", "train.lr=1e30"))
    assert run_folders(tmp_path / "runs") == []  # diverged in epoch 1: no run, nothing left that looks like one
    # A finite explosion (loss ~1e19 at lr 1e6) is no success either.
    with pytest.raises(TrainingDiverged, match=r"training \(epoch 1, step 2\) loss became \d.*e\+"):
        train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, tmp_path / "runs2", "train.lr=1e6"))
    assert run_folders(tmp_path / "runs2") == []

    # Resumed after two good epochs with a learning rate that explodes the weights: the third
    # epoch diverges, and the epoch-2 checkpoints stay exactly as they were.
    run = copy_run(tiny_run, tmp_path / "copy")
    last = load_checkpoint(run.last)
    last["optimizer"]["param_groups"][0]["lr"] = 1e30
    torch.save(last, run.last)
    before = {p.name: sha256(p) for p in (run.last, run.best, run.history)}
    done = train_cli(["--resume", str(run.root), "--set", "train.epochs=3"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "\r" not in done.stderr  # no progress bars in a log that is not a terminal
    last_line = error_lines(done.stderr)[-1]
    assert last_line.startswith("error: the training (epoch 3, step 2) loss became")
    assert f"{run.last} (epoch 2)" in last_line
    assert {p.name: sha256(p) for p in (run.last, run.best, run.history)} == before


def test_a_failed_start_leaves_no_run_folder(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="no training batch: train.batch_size=1000 is larger than the training split"):
        train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, "train.batch_size=1000"))
    assert run_folders(runs) == []  # was: a folder of config.yaml and splits.csv that looked like a run


def test_a_training_split_of_one_class_is_refused(tmp_path, phantom):
    from PIL import Image

    for split, n in (("train", 12), ("test", 2)):
        folder = tmp_path / "kaggle" / "chest_xray" / split / "NORMAL"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(phantom(64, 64)).save(folder / f"IM-{i + 100 * (split == 'test'):04d}-0001.jpeg")
    runs = tmp_path / "runs"
    overrides = [*tiny_overrides(tmp_path, runs), "data.sources=[kaggle]", f"data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match="the training split has 0 positive images of 11: a classifier needs both"):
        train("--config", "demo.yaml", "--set", *overrides)
    assert run_folders(runs) == []


def _sleeper() -> "subprocess.Popen":
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_run_that_is_training_is_not_trained_a_second_time(tiny_run, tmp_path):
    import socket

    run = copy_run(tiny_run, tmp_path)
    holder = _sleeper()  # a live process of this host stands for the first train.py
    try:
        run.lock.write_text(f"{socket.gethostname()} {holder.pid}\n")
        with pytest.raises(ConfigError, match=rf"is being trained by another process \(.* {holder.pid}\); if no "
                                              rf"training of it is running, delete {re.escape(str(run.lock))}"):
            train("--resume", str(run.root), "--set", "train.epochs=3")
    finally:
        holder.kill()
        holder.wait()
    assert len(pd.read_csv(run.history)) == 2
    run.lock.unlink()  # what the message says to do once no training of it runs
    assert train("--resume", str(run.root), "--set", "train.epochs=3") == 0
    assert len(pd.read_csv(run.history)) == 3 and not run.lock.exists()


def test_a_new_run_is_locked_while_it_trains(tiny_data, tmp_path):
    from pylon.engine import fit

    cfg = load_config("demo.yaml", tiny_overrides(tiny_data, tmp_path / "runs", "train.epochs=1"))
    seen = []
    fit(cfg, on_epoch=lambda epoch, row: seen.append([p.name for p in only_run(tmp_path / "runs").root.iterdir()]))
    assert "training.lock" in seen[0] and not only_run(tmp_path / "runs").lock.exists()


def test_sigterm_stops_training_like_ctrl_c_and_names_the_run_to_resume(tiny_data, tmp_path):
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from conftest import quiet_wandb_env

    runs = tmp_path / "runs with a space"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **quiet_wandb_env(tmp_path / ".wandb-home")}
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), "--config", "demo.yaml", "--set",
                             *tiny_overrides(tiny_data, runs, "train.epochs=1000")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/checkpoints/last.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    (run,) = run_folders(runs)
    lines = error_lines(stderr)
    assert lines[-1] == "interrupted" and "Traceback" not in stderr
    assert lines[-2].endswith(f"resume with: python train.py --resume {shlex.quote(str(run))}")
    assert not (run / "training.lock").exists()


def test_printed_resume_hint_quotes_a_path_with_spaces():
    text = train_module.format_summary({"run": "/data/my runs/demo-1", "best_checkpoint": "b", "last_checkpoint": "l",
                                        "history": "h"})
    assert "python train.py --resume '/data/my runs/demo-1'" in text


def test_resume_accepts_only_settings_that_can_change_mid_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    config = run.config.read_text()
    for key in ("train.lr=0.1", "data.image_size=96", "model.backbone=resnet34"):
        with pytest.raises(ConfigError, match=f"--set {key.split('=')[0]} cannot change in a resumed run"):
            train("--resume", str(run.root), "--set", key)
    assert run.config.read_text() == config


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    from pylon import runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20990101-000000")
    first, second = runs.new_run(tmp_path, "demo"), runs.new_run(tmp_path, "demo")
    assert (first.root.name, second.root.name) == ("demo-20990101-000000", "demo-20990101-000000-2")


def test_unwritable_runs_folder_fails_before_any_data_work(tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="logging.runs_dir=.*a-file/runs is not writable .*a-file is not a writable"):
        train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, blocker / "runs", f"data.cache_dir={cache}"))
    assert not cache.exists()


def test_unwritable_cache_folder_fails_in_one_line_naming_the_key(tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="data.cache_dir=.*a-file/cache is not writable .*set --set data.cache_dir="):
        train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, f"data.cache_dir={blocker / 'cache'}"))
    assert run_folders(runs) == []


def test_run_stores_absolute_data_roots_and_its_split_manifest(tiny_run):
    run = RunPaths(tiny_run)
    cfg = load_config(run.config)
    assert all(Path(p).is_absolute() for p in (cfg.data.roots.kaggle, cfg.data.roots.rsna, cfg.data.cache_dir))
    manifest = pd.read_csv(run.splits)
    data = prepare_data(cfg.data, progress=False)
    for split in ("train", "val", "test"):
        assert sorted(manifest[manifest.split == split].id) == sorted(r.id for r in data.records(split))


def test_a_cosine_run_given_more_epochs_never_raises_its_rate(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, "train.scheduler=cosine")) == 0
    run = only_run(runs)
    assert train("--resume", str(run.root), "--set", "train.epochs=4") == 0
    lrs = pd.read_csv(run.history)["lr"].tolist()
    assert len(lrs) == 4 and all(later <= earlier for earlier, later in zip(lrs, lrs[1:])), lrs


def test_warmup_raises_the_rate_step_by_step_then_the_scheduler_takes_over(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    extra = ("train.epochs=3", "train.warmup_epochs=2", "train.max_steps_per_epoch=2", "train.scheduler=cosine")
    assert train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, *extra)) == 0
    lrs = pd.read_csv(only_run(runs).history)["lr"].tolist()  # the rate of each epoch's last step
    assert lrs[:2] == pytest.approx([1e-3 * 2 / 4, 1e-3]) and lrs[2] < 1e-3


def test_evaluation_reports_the_val_loss_best_pt_was_chosen_on(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, "train.pos_weight=3.0",
                                                                  "train.epochs=1")) == 0
    run = only_run(runs)
    best = load_checkpoint(run.best)
    assert best["pos_weight"] == 3.0
    from conftest import load_script

    assert load_script("evaluate").main(["--run", str(run.root), "--split", "val", "--set", "eval.bootstrap=0"]) == 0
    classification = json.loads((run.eval_dir / "metrics.json").read_text())["classification"]
    assert classification["loss"] == pytest.approx(best["val_loss"], rel=1e-5) and "loss_note" not in classification


# ---------------------------------------------------------------------------------------------
# Starting from a trained run (model.weights=<run>)


def _head_keys(state: dict) -> list[str]:
    return [k for k in state if not k.startswith("encoder.")]


def test_weights_from_a_run_start_encoder_decoder_and_head_from_its_checkpoint(tiny_run, tiny_data, tmp_path, capsys):
    source = RunPaths(tiny_run)
    runs = tmp_path / "runs"
    overrides = tiny_overrides(tiny_data, runs, f"model.weights={tiny_run}", "train.epochs=1",
                               "train.max_steps_per_epoch=1")
    cfg = load_config("demo.yaml", overrides)
    seed_everything(cfg.train.seed)  # what the run builds before its first step
    assert_same_tensors(build_model(cfg.model).state_dict(), weights(source.best))
    cfg.model.weights = str(source.last)  # a run's checkpoint file names that checkpoint
    assert_same_tensors(build_model(cfg.model).state_dict(), weights(source.last))

    capsys.readouterr()
    assert train("--config", "demo.yaml", "--set", *overrides) == 0
    out = capsys.readouterr().out
    n = len(_head_keys(weights(source.best)))
    assert f"model.weights: encoder + {n} of {n} decoder/head tensors from run {tiny_run.name} (" in out
    run = only_run(runs)
    summary = json.loads(out.strip().splitlines()[-1])
    for record in (summary["init_from"], load_checkpoint(run.best)["init_from"], load_checkpoint(run.last)["init_from"]):
        assert record["path"] == str(source.best.resolve()) and record["run"] == tiny_run.name
        assert record["loaded"].startswith(f"model.weights: encoder + {n} of {n} decoder/head tensors")


def test_across_architectures_and_from_a_plain_file_only_the_encoder_is_taken(tiny_run, tiny_data, tmp_path):
    runs = tmp_path / "runs"
    extra = ("train.epochs=1", "train.max_steps_per_epoch=1")
    assert train("--config", "demo_baseline.yaml", "--set", *tiny_overrides(tiny_data, runs, *extra)) == 0
    baseline_run = only_run(runs)
    plain = tmp_path / "pylon_state.pt"  # a whole PYLON state dict outside a run: encoder weights, as always
    torch.save(weights(RunPaths(tiny_run).best), plain)

    def built(config: str, weights_spec) -> tuple:
        cfg = load_config(config, tiny_overrides(tiny_data, runs, f"model.weights={weights_spec}"))
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model)
        return model.state_dict(), model.init_note

    for config, spec, source in (("demo.yaml", baseline_run.root, baseline_run.best),
                                 ("demo_baseline.yaml", tiny_run, RunPaths(tiny_run).best),
                                 ("demo.yaml", plain, RunPaths(tiny_run).best)):
        state, note = built(config, spec)
        fresh, _ = built(config, "null")
        trained = weights(source)
        assert_same_tensors({k: state[k] for k in state if k.startswith("encoder.")},
                            {k: trained[k] for k in trained if k.startswith("encoder.")})
        assert_same_tensors({k: state[k] for k in _head_keys(state)}, {k: fresh[k] for k in _head_keys(fresh)})
        if spec == plain:
            assert note == f"model.weights: encoder from {plain}"
        else:
            n = len(_head_keys(state))
            assert f"encoder + 0 of {n} " in note and "not loaded: " in note


# ---------------------------------------------------------------------------------------------
# Merged sources: per-source draws and per-source model selection


def test_select_on_a_source_chooses_best_pt_and_stops_on_that_sources_val_loss(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    extra = ("train.select_on=rsna", "train.epochs=4", "train.early_stop_patience=1", "data.val_fraction=0.3",
             "data.source_shares={rsna: 1, kaggle: 1}")
    capsys.readouterr()
    assert train("--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs, *extra)) == 0
    out = capsys.readouterr().out
    run = only_run(runs)
    history = pd.read_csv(run.history)
    assert (history["val_select_loss"] == history["val_loss_rsna"]).all()
    # The pooled loss is the per-source losses weighed by each source's val images.
    val = prepare_data(load_config(run.config).data, progress=False).records("val")
    n = {s: sum(r.source == s for r in val) for s in ("kaggle", "rsna")}
    pooled = (n["kaggle"] * history["val_loss_kaggle"] + n["rsna"] * history["val_loss_rsna"]) / len(val)
    assert history["val_loss"].tolist() == pytest.approx(pooled.tolist(), rel=1e-6)

    rsna = history["val_loss_rsna"].tolist()
    stale = next((i for i in range(1, len(rsna)) if rsna[i] >= min(rsna[:i])), None)  # patience 1 stops there
    assert len(rsna) == (4 if stale is None else stale + 1)
    best_epoch = int(history.loc[history["val_loss_rsna"].idxmin(), "epoch"])
    best = load_checkpoint(run.best)
    assert best["epoch"] == best_epoch and best["select_on"] == "rsna"
    assert best["val_select_loss"] == pytest.approx(min(rsna), rel=1e-12)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["select_on"] == "rsna" and summary["best_epoch"] == best_epoch
    assert summary["best_val_loss"] == pytest.approx(min(rsna), rel=1e-12)
    assert f"best epoch {best_epoch} of {len(rsna)}: rsna val loss {min(rsna):.4f}" in out
    assert "training draws per source (data.source_shares): kaggle 50.0% (" in out


def test_selection_losses_pooled_mean_of_sources_or_one_source():
    from pylon.trainstate import selection_loss

    val = {"loss": 0.5, "source_losses": {"kaggle": 0.2, "rsna": 1.0}}
    assert [selection_loss(val, name) for name in ("pooled", "mean_sources", "rsna")] == [0.5, 0.6, 1.0]


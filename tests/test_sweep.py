"""Sweeps: tools/sweep.py runs the shipped Optuna sweep files on the tiny generated data set (each
trial a complete run folder, pruning through the engine's on_epoch hook, failed trials recorded,
continuation, best.yaml); mistakes in a sweep file are one line, before anything trains."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from conftest import REPO_ROOT, load_script, tiny_overrides
from pylon import engine, trainstate
from pylon.checkpoint import load_checkpoint
from pylon.config import load_config, to_dict
from pylon.runs import RunPaths

sweep = load_script("tools/sweep")
train_script = load_script("train")
SHIPPED = sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))
FAST = ("train.max_steps_per_epoch=2",)


def sweep_args(tiny_data: Path, runs: Path, *extra: str) -> list[str]:
    return ["--set", *tiny_overrides(tiny_data, runs, *FAST, *extra)]


def only_sweep(runs: Path) -> Path:
    (folder,) = (runs / "sweeps").iterdir()
    return folder


def trial_folders(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir())


class Trained(Exception):
    """Raised by a stand-in for the engine's fit: train.py parsed and loaded this config."""

    def __init__(self, cfg):
        super().__init__("fit called")
        self.cfg = cfg


def config_train_py_would_train(monkeypatch, argv: list[str]):
    """train.py's own argument parsing and config loading, stopped where training would start."""
    def fit(cfg, run=None, on_epoch=None):
        raise Trained(cfg)

    monkeypatch.setattr(engine, "fit", fit)
    with pytest.raises(Trained) as caught:
        train_script.main(argv)
    return caught.value.cfg


# ---------------------------------------------------------------------------------------------
# The shipped sweep files


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_sweeps_are_accepted_by_optuna_and_the_config_loader(path):
    _, space = sweep.read_space(str(path))
    assert (REPO_ROOT / "configs" / space.config).is_file()
    params = sweep.distributions(path, space, space.config, space.set)  # every key at the ends of its range
    assert set(params) == set(space.parameters) and "train.lr" in params
    sampler_kwargs, pruner = sweep.search_policy(path, space, params, 8)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert isinstance(sweep.optuna_object(optuna.samplers, space.sampler, sampler_kwargs), optuna.samplers.TPESampler)


# ---------------------------------------------------------------------------------------------
# The engine hook


def test_on_epoch_true_ends_the_run_after_that_epoch_like_an_early_stop(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    cfg = load_config("demo.yaml", tiny_overrides(tiny_data, runs, "train.epochs=3", "train.max_steps_per_epoch=1"))
    asked = []
    summary = engine.fit(cfg, on_epoch=lambda epoch, row: asked.append((epoch, row)) or epoch == 2)
    run = RunPaths(summary["run"])
    history = pd.read_csv(run.history)
    assert [epoch for epoch, _ in asked] == [1, 2] and history["epoch"].tolist() == [1, 2]
    assert [row["val_loss"] for _, row in asked] == pytest.approx(history["val_loss"].tolist())
    assert summary["stop_reason"] == trainstate.PRUNED == "stopped by the sweep's pruner"
    loop = load_checkpoint(run.last)["loop"]
    assert loop["epoch"] == 2 and loop["stop_reason"] == trainstate.PRUNED and run.best.is_file()
    capsys.readouterr()
    assert train_script.main(["--resume", str(run.root)]) == 0  # a finished run, not an interrupted one
    assert "nothing to resume" in capsys.readouterr().out and len(pd.read_csv(run.history)) == 2


# ---------------------------------------------------------------------------------------------
# tools/sweep.py end to end


def test_sweep_runs_complete_trial_folders_prunes_continues_and_writes_best(tiny_data, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    # Trial 1's pruner says stop after its first epoch; what the engine and the sweep do with
    # that is real. (Hyperband itself is Optuna's: which trial it stops depends on the losses.)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number == 1)
    assert sweep.main(["--space", "demo", "--trials", "3", *sweep_args(tiny_data, runs)]) == 0
    sweep_dir = only_sweep(runs)
    assert sweep_dir.name.startswith("demo-")
    folders = trial_folders(sweep_dir)
    assert [p.name[:13] for p in folders] == ["demo-trial000", "demo-trial001", "demo-trial002"]
    assert {p.name for p in sweep_dir.iterdir()} - {p.name for p in folders} == {
        "optuna_journal.log", "sweep.csv", "best.yaml"}

    table = pd.read_csv(sweep_dir / "sweep.csv")
    assert list(table.columns) == ["number", "state", "train.lr", "train.weight_decay",
                                   "best_val_loss", "epochs", "run", "error"]
    assert table["state"].tolist() == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert table["epochs"].tolist() == [2, 1, 2]  # --set wins over the file's set (train.epochs=8)
    study = optuna.load_study(study_name="sweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna_journal.log"))))
    for (_, row), trial in zip(table.iterrows(), study.trials):
        run = RunPaths(row["run"])
        assert run.root.parent == sweep_dir and run.best.is_file() and run.last.is_file()
        cfg = load_config(run.config)
        assert cfg.name == f"demo-trial{row['number']:03d}" and cfg.logging.runs_dir == str(sweep_dir)
        assert cfg.logging.group == sweep_dir.name and cfg.train.epochs == 2  # one W&B group per sweep
        assert cfg.train.lr == pytest.approx(row["train.lr"], rel=1e-12)
        assert cfg.train.weight_decay == pytest.approx(row["train.weight_decay"], rel=1e-12)
        history = pd.read_csv(run.history)
        assert len(history) == row["epochs"] and row["best_val_loss"] == pytest.approx(history["val_loss"].min())
        # Every epoch was reported, also the last one, where the all-epochs rule had already fired.
        assert list(trial.intermediate_values.values()) == pytest.approx(history["val_loss"].tolist())
        reason = load_checkpoint(run.last)["loop"]["stop_reason"]
        assert reason == (trainstate.PRUNED if row["state"] == "PRUNED" else trainstate.ALL_EPOCHS_DONE)
    assert set(sweep.VAL_METRICS) == {c for c in history.columns if c.startswith("val_")
                                      and not c.startswith(sweep.SOURCE_LOSS)}
    assert {c for c in history.columns if c.startswith(sweep.SOURCE_LOSS)} == {"val_loss_kaggle", "val_loss_rsna"}

    complete = table[table["state"] == "COMPLETE"]
    best_row = complete.loc[complete["best_val_loss"].idxmin()]
    assert study.best_trial.number == best_row["number"]
    best = to_dict(load_config(sweep_dir / "best.yaml"))
    expected = to_dict(load_config(Path(best_row["run"]) / "config.yaml"))
    expected["name"], expected["logging"]["runs_dir"] = "demo", str(runs)  # trains a normal run, not a trial
    expected["logging"]["group"] = None
    assert best == expected
    out = capsys.readouterr().out
    assert "trial 1 PRUNED: val_loss" in out and "after 1 epoch (train.lr=" in out
    assert f"train it: python train.py --config {sweep_dir / 'best.yaml'}" in out
    cfg = config_train_py_would_train(monkeypatch, ["--config", str(sweep_dir / "best.yaml")])
    assert to_dict(cfg) == best

    monkeypatch.undo()
    assert sweep.main(["--space", "demo", "--trials", "1", "--out", str(sweep_dir),
                       *sweep_args(tiny_data, runs)]) == 0
    table = pd.read_csv(sweep_dir / "sweep.csv")
    assert table["number"].tolist() == [0, 1, 2, 3] and len(trial_folders(sweep_dir)) == 4
    # Hyperband's call now; its one rung (min_iter 2) is the last epoch, and a trial that trained
    # every epoch is complete whatever the pruner says there.
    assert table["state"].iloc[3] == "COMPLETE"
    assert table["train.lr"].iloc[3] not in table["train.lr"].iloc[:3].tolist()  # the sampler did not restart

    with pytest.raises(SystemExit) as stop:  # a continuation must sweep the same thing
        sweep.cli.run(sweep.main, ["--space", "demo", "--trials", "1", "--out", str(sweep_dir),
                                   *sweep_args(tiny_data, runs, "train.seed=1")])
    assert stop.value.code == 2
    assert "was started with other overrides" in capsys.readouterr().err
    assert len(trial_folders(sweep_dir)) == 4


def test_a_diverging_trial_is_recorded_failed_and_the_sweep_goes_on(tiny_data, tmp_path, capsys):
    space = tmp_path / "grid.yaml"
    space.write_text(yaml.safe_dump({
        "config": "demo.yaml", "metric": "val_auroc", "sampler": "GridSampler",
        "parameters": {"train.lr": {"type": "categorical", "choices": [1.0e-3, 1.0e13]}}}))
    runs = tmp_path / "runs"
    assert sweep.main(["--space", str(space), "--trials", "5", *sweep_args(tiny_data, runs, "train.epochs=1")]) == 0
    table = pd.read_csv(only_sweep(runs) / "sweep.csv").set_index("train.lr")
    assert len(table) == 2  # the grid is done after its two points, whatever --trials says
    assert table.loc[1e13, "state"] == "FAIL" and table.loc[1e13, "epochs"] == 0
    assert table.loc[1e-3, "state"] == "COMPLETE" and math.isfinite(table.loc[1e-3, "best_val_auroc"])
    assert load_config(only_sweep(runs) / "best.yaml").train.lr == 1e-3
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ") and " FAIL" in line]
    assert len(failed) == 1 and "(train.lr=1e+13): the training (epoch 1, step" in failed[0]
    assert "loss became" in table.loc[1e13, "error"]


# ---------------------------------------------------------------------------------------------
# Reading the file: distributions, samplers, pruners, and mistakes as one line


def write_space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "configs" / "sweeps" / "demo.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_file_names_optuna_distributions_samplers_and_pruners(tmp_path):
    path = write_space(tmp_path, sampler="RandomSampler", pruner_kwargs={"min_resource": 1, "reduction_factor": 2},
                       parameters={
                           "train.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
                           "train.grad_clip": {"type": "float", "low": 0.5, "high": 2.0},
                           "data.augment.hflip": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
                           "train.plateau_patience": {"type": "int", "low": 0, "high": 3},
                           "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw"]}})
    _, space = sweep.read_space(str(path))
    params = sweep.distributions(path, space, space.config, space.set)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = {key: sweep.suggest(trial, key, dist) for key, dist in params.items()}
    assert trial.distributions == params == {
        "train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
        "train.grad_clip": optuna.distributions.FloatDistribution(0.5, 2.0),
        "data.augment.hflip": optuna.distributions.FloatDistribution(0.0, 1.0, step=0.25),
        "train.plateau_patience": optuna.distributions.IntDistribution(0, 3),
        "train.optimizer": optuna.distributions.CategoricalDistribution(["adam", "adamw"])}
    assert isinstance(values["train.plateau_patience"], int) and values["train.optimizer"] in ("adam", "adamw")

    sampler_kwargs, pruner = sweep.search_policy(path, space, params, epochs=9)
    assert isinstance(sweep.optuna_object(optuna.samplers, space.sampler, sampler_kwargs), optuna.samplers.RandomSampler)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)  # over epochs, up to train.epochs by default
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (1, 9, 2)
    space.pruner, space.pruner_kwargs = "MedianPruner", {}
    assert isinstance(sweep.search_policy(path, space, params, epochs=9)[1], optuna.pruners.MedianPruner)
    space.sampler, grid = "GridSampler", {"train.optimizer": params["train.optimizer"]}
    assert sweep.search_policy(path, space, grid, epochs=9)[0] == {"search_space": {"train.optimizer": ["adam", "adamw"]}}


def test_ranges_are_checked_with_what_every_trial_sets_besides(tmp_path):
    path = write_space(tmp_path, parameters={"train.lr": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True}})
    _, space = sweep.read_space(str(path))
    sweep.distributions(path, space, space.config, [*space.set, "train.min_lr=1.0e-7"])  # --set allows it


LR_TOO_LOW = {"train.lr": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True}}


@pytest.mark.parametrize("changes, args, message", [
    ({"parameters": {"train.lrr": {"type": "categorical", "choices": [0.1]}}}, [], "space.yaml: unknown key 'train.lrr'"),
    ({"metric": "test_auroc"}, [], "metric 'test_auroc' is not a validation column"),
    ({"metric": "train_loss"}, [], "a sweep never selects on the test split"),
    ({"parameters": {"train.lr": {"type": "normal", "mu": 0, "sigma": 1}}}, [], "Unknown distribution type: normal"),
    ({"parameters": {"train.lr": {"type": "float", "low": "1e-4", "high": 1.0, "log": True}}}, [], "write 1.0e-4"),
    ({"parameters": {"train.lr": {"type": "float", "low": 1.0e-2, "high": 1.0e-4}}}, [], "`low <= high` must hold"),
    ({"parameters": {"train.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}}}, [],
     "bad value for 'train.optimizer'"),
    ({"parameters": {"train.grad_clip": {"type": "categorical", "choices": [None, 1.0]}}}, [],
     "bad value for 'train.grad_clip'"),  # null would reach the config as the text 'None'
    ({"parameters": {"train": {"lr": {"type": "float", "low": 0.1, "high": 1.0}}}}, [], "parameter train: KeyError"),
    ({"pruner_kwargs": {"min_resource": 2, "max_iter": 27}}, [], "unexpected keyword argument 'max_iter'"),
    ({"sampler": "BayesSampler"}, [], "module 'optuna.samplers' has no attribute 'BayesSampler'"),
    ({"sampler": "GridSampler"}, [], "a GridSampler needs every parameter categorical"),
    ({"controller": {"type": "local"}}, [], "space.yaml: Key 'controller' not in 'Space'"),
    ({"config": None}, [], "missing mandatory value: config"),
    ({"parameters": LR_TOO_LOW, "set": ["train.scheduler=plateau"]}, [], "train.lr=1e-06 is below train.min_lr=1e-05"),
    ({}, ["--set", "train.lr=0.1"], "--set train.lr is swept by"),
    ({}, ["--trials", "0"], "--trials must be at least 1, got 0"),
    ({}, ["--space", "no_such_sweep"], "sweep file not found: no_such_sweep (configs/sweeps/ has: demo.yaml"),
    ({}, ["--out", "{tmp}"], "is not a sweep folder (no optuna_journal.log in it)"),
    ({}, ["--out", "{tmp}/space.yaml/sweep"], "--out={tmp}/space.yaml/sweep is not writable"),
])
def test_mistakes_are_one_line_and_nothing_trains(tmp_path, capsys, changes, args, message):
    path = write_space(tmp_path, **changes)
    runs = tmp_path / "runs"
    argv = ["--space", str(path), "--trials", "2", *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    with pytest.raises(SystemExit) as stop:
        sweep.cli.run(sweep.main, [*argv, "--set", f"logging.runs_dir={runs}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert not runs.exists()

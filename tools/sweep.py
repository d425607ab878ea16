"""Hyper-parameter sweep with Optuna: python tools/sweep.py --space S --trials N [--config X] [--set k=v ...] [--out DIR] [--seed S]

Each trial of the space file (in Optuna's terms, see configs/sweeps/demo.yaml) is a normal run trained by the
engine in this process, pruned after any epoch. The sweep folder <runs_dir>/sweeps/<name>-<time>/ (or --out,
which continues it) holds the trials' runs, optuna_journal.log, sweep.csv (a row per trial) and best.yaml.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import optuna
import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pylon import cli
from pylon.config import ConfigError, load_config, to_yaml
from pylon.configfile import resolve_config_path
from pylon.data.sources import SOURCES
from pylon.engine import fit
from pylon.runs import check_writable, new_run
from pylon.trainstate import PRUNED, TrainingDiverged

SWEEP_DIR = Path(__file__).resolve().parent.parent / "configs" / "sweeps"  # where a bare --space name is looked up
# history.csv's validation columns, besides each source's val_loss_<source>
VAL_METRICS = ("val_loss", "val_select_loss", "val_auroc", "val_accuracy", "val_sensitivity", "val_specificity")
SOURCE_LOSS = "val_loss_"
JOURNAL = "optuna_journal.log"


@dataclass
class Space:
    """A sweep file, whose keys and types OmegaConf checks."""

    config: str  # what every trial trains; --config overrides it
    parameters: dict[str, Any]  # config key -> {type: float|int|categorical, low, high, step, log, choices}
    metric: str = "val_loss"  # losses are minimized, the rest maximized
    sampler: str = "TPESampler"  # seeded with --seed; a GridSampler's grid is the categorical choices
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    pruner: str = "MedianPruner"  # told the metric after every epoch
    pruner_kwargs: dict[str, Any] = field(default_factory=dict)  # a HyperbandPruner's max_resource: train.epochs
    set: list[str] = field(default_factory=list)  # --set values of every trial (--set here wins, but not on a swept key)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_config_args(parser, required=False)
    parser.add_argument("--space", required=True, help="a sweep file, or a bare name in configs/sweeps/ (e.g. demo)")
    parser.add_argument("--trials", type=int, required=True, help="trials to run now (added to those of --out)")
    parser.add_argument("--out", help="the sweep folder (default <runs_dir>/sweeps/<name>-<time>); "
                        "an existing sweep folder is continued")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tools/sweep.py trains its trials one after another in one process: "
                          "start it with python, not torchrun")
    path, space = read_space(args.space)
    config, out = args.config or space.config, args.out
    swept = {item.split("=", 1)[0].strip() for item in args.overrides} & set(space.parameters)
    if swept:
        raise ConfigError(f"--set {min(swept)} is swept by {path}; leave it out or change the file's set")
    overrides = [*space.set, *args.overrides]
    params = distributions(path, space, config, overrides)
    base = load_config(config, overrides)
    sampler_kwargs, pruner = search_policy(path, space, params, int(base.train.epochs))
    check_writable(out or base.logging.runs_dir, "--out" if out else "logging.runs_dir")
    sweep_dir = Path(out) if out else new_run(Path(base.logging.runs_dir) / "sweeps", base.name).root
    setup = {"config": str(resolve_config_path(config).resolve()), "overrides": overrides,
             "space": json.loads(json.dumps(vars(space)))}
    study = open_study(sweep_dir, setup, pruner, "minimize" if "loss" in space.metric else "maximize")
    # Seeded past the trials already run: a continued random search must not repeat them.
    study.sampler = optuna_object(optuna.samplers, space.sampler, {**sampler_kwargs, "seed": args.seed + len(study.trials)})
    trial_overrides = [*overrides, f"logging.group={sweep_dir.name}", f"logging.runs_dir={sweep_dir}"]
    objective = functools.partial(run_trial, space.metric, params, config, trial_overrides, sweep_dir, base.name)
    try:
        study.optimize(objective, args.trials, callbacks=[functools.partial(report, space.metric)], gc_after_trial=True,
                       catch=(TrainingDiverged, ConfigError, torch.OutOfMemoryError))  # each ends its trial only
    finally:
        write_results(study, space.metric, sweep_dir, base)
    if not (sweep_dir / "best.yaml").is_file():
        print(f"no trial completed, so no best.yaml; see {sweep_dir / 'sweep.csv'}")
        return 1
    best = study.best_trial
    print(f"best: trial {best.number}, {space.metric} {best.value:.4f} ({best.user_attrs['run']})")
    print(f"train it: python train.py --config {sweep_dir / 'best.yaml'}")
    return 0


def read_space(name_or_path: str) -> tuple[Path, Space]:
    path = resolve_config_path(name_or_path, SWEEP_DIR, "sweep file")
    try:
        return path, OmegaConf.to_object(OmegaConf.merge(Space, yaml.safe_load(path.read_text())))  # type: ignore
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None


def distributions(path: Path, space: Space, config: str, overrides: list[str]) -> dict[str, Any]:
    """Each swept key's Optuna distribution. Every key is loaded at both ends of its range (or with each
    choice) on top of what every trial sets besides: a typo or an impossible value fails here, by name."""
    found = {}
    for key, spec in space.parameters.items():
        try:
            found[key] = dist = optuna.distributions.json_to_distribution(json.dumps(spec))
            for value in getattr(dist, "choices", None) or (dist.low, dist.high):
                load_config(config, [*overrides, f"{key}={value}"])
        except ConfigError as err:  # the loader calls the value a --set; here it is the file's
            raise ConfigError(f"{path}: {str(err).removeprefix('--set: ')}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}: parameter {key}: {type(err).__name__} {err} (e.g. {{type: float, low: "
                              "1.0e-4, high: 1.0e-2, log: true}; YAML reads 1e-4 as text: write 1.0e-4)") from None
    return found


def optuna_object(module: Any, name: str, kwargs: dict[str, Any]) -> Any:
    """``module.name(**kwargs)``, with Optuna's objections as one line."""
    try:
        return getattr(module, name)(**kwargs)
    except (AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"{module.__name__}.{name}: {err}") from None


def search_policy(path: Path, space: Space, params: dict[str, Any], epochs: int) -> tuple[dict[str, Any], Any]:
    """The sampler's keyword arguments (a continuation reseeds it) and the pruner, both checked by Optuna now."""
    if space.metric not in VAL_METRICS and space.metric.removeprefix(SOURCE_LOSS) not in SOURCES:
        raise ConfigError(f"{path}: metric {space.metric!r} is not a validation column of history.csv "
                          f"({', '.join(VAL_METRICS)}, {SOURCE_LOSS}<source>): a sweep never selects on the test split")
    sampler_kwargs = dict(space.sampler_kwargs)
    if space.sampler == "GridSampler":
        if not all(hasattr(dist, "choices") for dist in params.values()):
            raise ConfigError(f"{path}: a GridSampler needs every parameter categorical")
        sampler_kwargs["search_space"] = {key: list(dist.choices) for key, dist in params.items()}
    optuna_object(optuna.samplers, space.sampler, sampler_kwargs)
    pruner_kwargs = {"max_resource": epochs} if space.pruner == "HyperbandPruner" else {}  # the resource is the epoch
    return sampler_kwargs, optuna_object(optuna.pruners, space.pruner, {**pruner_kwargs, **space.pruner_kwargs})


def open_study(sweep_dir: Path, setup: dict[str, Any], pruner: Any, direction: str) -> Any:
    """The study in the sweep folder: new, or continued when it was started with the same setup."""
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not (sweep_dir / JOURNAL).is_file():
        raise ConfigError(f"--out {sweep_dir} is not a sweep folder (no {JOURNAL} in it)")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweep folder: {sweep_dir}", flush=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line (report), no traceback
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / JOURNAL)))
    study = optuna.create_study(storage=storage, study_name="sweep", direction=direction, pruner=pruner,
                                load_if_exists=True)
    stored = study.user_attrs.get("setup", setup)
    if stored != setup:
        changed = " and ".join(key for key in setup if stored[key] != setup[key])
        raise ConfigError(f"{sweep_dir} was started with other {changed}: continue it with --config "
                          f"{stored['config']} and the same --space and --set")
    study.set_user_attr("setup", setup)
    return study


def best_of(metric: str, values: Iterable[float]) -> Optional[float]:
    """The best finite value an epoch reported (None: none was finite)."""
    finite = [v for v in values if math.isfinite(v)]
    return (min if "loss" in metric else max)(finite) if finite else None


def write_results(study: Any, metric: str, sweep_dir: Path, base: Any) -> None:
    """sweep.csv (a row per trial) and best.yaml: the best run's config as a normal run of the base config."""
    rows = [{"number": t.number, "state": t.state.name, **t.params,
             f"best_{metric}": best_of(metric, t.intermediate_values.values()), "epochs": len(t.intermediate_values),
             "run": t.user_attrs.get("run"), "error": t.user_attrs.get("error")} for t in study.trials]
    pd.DataFrame(rows).to_csv(sweep_dir / "sweep.csv", index=False)
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        best = load_config(Path(study.best_trial.user_attrs["run"]) / "config.yaml", [
            f"name={base.name}", f"logging.runs_dir={base.logging.runs_dir}",
            f"logging.group={base.logging.group or 'null'}"])
        (sweep_dir / "best.yaml").write_text(to_yaml(best))


def run_trial(metric: str, params: dict[str, Any], config: str, overrides: list[str], sweep_dir: Path,
              sweep_name: str, trial: Any) -> float:
    """A trial: its config through the loader, a normal run by the engine, pruned on the metric."""
    name = f"{sweep_name}-trial{trial.number:03d}"
    sampled = [f"{key}={suggest(trial, key, dist)}" for key, dist in params.items()]
    values: list[float] = []

    def on_epoch(epoch: int, row: dict) -> bool:
        values.append(float(row[metric]))
        trial.report(values[-1], epoch)
        return trial.should_prune()

    try:
        summary = fit(load_config(config, [*overrides, *sampled, f"name={name}"]), on_epoch=on_epoch)
    except Exception as err:
        trial.set_user_attr("error", str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise
    finally:
        run = next(sweep_dir.glob(f"{glob.escape(name)}-*"), None)  # the run folder fit made, if it got that far
        trial.set_user_attr("run", run and str(run))
    if summary["stop_reason"] == PRUNED:
        raise optuna.TrialPruned(f"pruned after epoch {len(values)}")
    best = best_of(metric, values)
    if best is None:
        raise ConfigError(f"{metric} was never finite (e.g. AUROC on a one-class validation split)")
    return best


def report(metric: str, study: Any, trial: Any) -> None:
    """One line per finished trial, as the study records it."""
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    best, epochs = best_of(metric, trial.intermediate_values.values()), len(trial.intermediate_values)
    value = "" if best is None else f": {metric} {best:.4f}"
    error = f": {trial.user_attrs['error']}" if trial.user_attrs.get("error") else ""
    print(f"trial {trial.number} {trial.state.name}{value} after {epochs} epoch{'s' * (epochs != 1)} ({params}){error}",
          flush=True)


def suggest(trial: Any, key: str, dist: Any) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    method = trial.suggest_int if isinstance(dist, optuna.distributions.IntDistribution) else trial.suggest_float
    return method(key, dist.low, dist.high, step=dist.step, log=dist.log)


if __name__ == "__main__":
    cli.run(main)

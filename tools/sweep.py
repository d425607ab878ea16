"""Hyper-parameter sweep, offline: python tools/sweep.py --space configs/sweeps/S.yaml --trials N [--config X] [--set k=v ...] [--out DIR] [--seed S]

The space file is a W&B sweep definition (``wandb sweep`` runs it on W&B, one train.py command per
run); this tool runs the same file with Optuna, every trial in this one process (not under
torchrun): method bayes/random/grid is a TPE/random/grid sampler; parameters are
log_uniform_values, uniform, q_uniform, int_uniform (min, max), values or value; early_terminate
hyperband (min_iter, eta) is Optuna's Hyperband pruner over epochs, and without it trials are
pruned by the median rule. The metric must be a val_* column of history.csv: a sweep never
selects on the test split. A trial's value is the best of its epochs' metric.

Each trial is a normal run folder trained by the engine (W&B as the config says), inside the sweep
folder <runs_dir>/sweeps/<name>-<time>/ (or --out): <name>-trialNNN-<time>/ per trial,
optuna_journal.log (the study; --out DIR continues it), sweep.csv (one row per trial) and
best.yaml (the best trial's config: python train.py --config DIR/best.yaml).

--config defaults to the one in the file's command. Values, later winning: the command's own
--set values, the file's fixed values, --set here (never a swept key), the sampled values.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pylon import cli

SWEEP_DIR = Path(__file__).resolve().parent.parent / "configs" / "sweeps"  # where a bare --space name is looked up
# history.csv's validation columns, each with the direction that is better.
VAL_METRICS = {"val_loss": "minimize", "val_select_loss": "minimize", "val_auroc": "maximize",
               "val_accuracy": "maximize", "val_sensitivity": "maximize", "val_specificity": "maximize"}
SOURCE_LOSS = "val_loss_"  # + a source's name: that source's val loss, minimized
W_AND_B_ONLY = ("program", "command", "project", "entity", "name", "description", "run_cap")
SET_BY_SWEEP = ("name", "logging.runs_dir")  # every trial is named and placed by the sweep
# Each distribution: its required and optional keys.
DISTRIBUTIONS = {"value": ({"value"}, set()), "values": ({"values"}, set()),
                 "log_uniform_values": ({"min", "max"}, set()), "uniform": ({"min", "max"}, set()),
                 "q_uniform": ({"min", "max"}, {"q"}), "int_uniform": ({"min", "max"}, set())}
ALIASES = {"constant": "value", "categorical": "values"}
ARGS_MACRO = "${args_no_hyphens}"
JOURNAL = "optuna_journal.log"
STUDY = "sweep"  # one study per folder; a fixed name keeps Hyperband's bracket of each trial reproducible


@dataclass
class Parameter:
    key: str
    kind: str  # a key of DISTRIBUTIONS
    choices: list = field(default_factory=list)  # value / values
    low: float = 0.0
    high: float = 0.0
    step: Optional[float] = None

    @property
    def fixed(self) -> bool:
        return self.kind == "value"

    def suggest(self, trial: Any) -> Any:
        if self.fixed:
            return self.choices[0]
        if self.kind == "values":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int_uniform":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_uniform_values",
                                   step=self.step if self.kind == "q_uniform" else None)

    def extremes(self) -> list:
        """Values that every sample lies among or between: checking them checks the key and its type."""
        return self.choices if self.kind in ("value", "values") else [self.low, self.high]


@dataclass
class Space:
    path: Path
    raw: dict
    method: str
    metric: str
    goal: str
    parameters: dict[str, Parameter]
    hyperband: Optional[dict]  # min_iter, eta
    config: str  # the command's --config
    command_overrides: list[str]  # the command's own --set values


def as_override(key: str, value: Any) -> str:
    """How the W&B agent writes a parameter for ``${args_no_hyphens}``: a value that trains here trains there."""
    return f"{key}={value}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_config_args(parser, required=False)
    parser.add_argument("--space", required=True,
                        help="a W&B sweep file, or a bare name in configs/sweeps/ (e.g. demo)")
    parser.add_argument("--trials", type=int, required=True, help="trials to run now (added to those of --out)")
    parser.add_argument("--out", help="the sweep folder (default <runs_dir>/sweeps/<name>-<time>); "
                        "an existing sweep folder is continued")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    args = parser.parse_args(argv)

    from pylon.config import ConfigError, resolve_config_path

    if args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tools/sweep.py trains its trials one after another in one process: "
                          "start it with python, not torchrun")
    space = read_space(args.space)
    if args.config and resolve_config_path(args.config).resolve() != resolve_config_path(space.config).resolve():
        print(f"note: sweeping {args.config}; the file's W&B command trains {space.config}")
    result = run_sweep(space, args.config or space.config, args.overrides, args.trials, args.out, args.seed)
    if result["best_trial"] is None:
        print(f"no trial completed, so no best.yaml; see {result['sweep'] / 'sweep.csv'}")
        return 1
    best = result["best_trial"]
    print(f"best: trial {best.number}, {space.metric} {best.value:.4f} ({best.user_attrs['run']})")
    print(f"train it: python train.py --config {result['sweep'] / 'best.yaml'}")
    return 0


# --------------------------------------------------------------------------- the sweep file


def read_space(name_or_path: str) -> Space:
    """The sweep file, checked for everything both W&B and this tool need; errors are one line."""
    import yaml

    from pylon.config import ConfigError, resolve_config_path

    path = resolve_config_path(name_or_path, SWEEP_DIR, "sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a W&B sweep definition (a mapping with method, metric, parameters, command)")
    unknown = sorted(set(raw) - {"method", "metric", "parameters", "early_terminate", *W_AND_B_ONLY})
    if unknown:
        raise ConfigError(f"{path}: unsupported sweep keys: {', '.join(unknown)}")
    method = raw.get("method")
    if method not in ("bayes", "random", "grid"):
        raise ConfigError(f"{path}: method must be bayes, random or grid, got {method!r}")
    metric = raw.get("metric") if isinstance(raw.get("metric"), dict) else {}
    name, goal = metric.get("name"), metric.get("goal")
    from pylon.data.sources import SOURCES

    wanted = {**VAL_METRICS, **{SOURCE_LOSS + source: "minimize" for source in SOURCES}}
    if name not in wanted:
        raise ConfigError(f"{path}: metric {name!r} is not a validation metric (one of {', '.join(wanted)}): "
                          "a sweep never selects on the test split")
    if goal != wanted[name]:
        raise ConfigError(f"{path}: metric {name} needs goal: {wanted[name]}, got {goal!r}")
    if Path(str(raw.get("program", ""))).name != "train.py":
        raise ConfigError(f"{path}: program must be train.py, got {raw.get('program')!r}")
    if not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise ConfigError(f"{path}: parameters must map config keys (e.g. train.lr) to distributions")
    parameters = {str(key): _parameter(str(key), spec, path) for key, spec in raw["parameters"].items()}
    if method == "grid":
        continuous = [k for k, p in parameters.items() if p.kind not in ("value", "values")]
        if continuous:
            raise ConfigError(f"{path}: a grid needs values for every parameter; {', '.join(continuous)} has a range")
    config, overrides = _command(raw.get("command"), path)
    return Space(path, raw, method, name, goal, parameters, _hyperband(raw.get("early_terminate"), path),
                 config, overrides)


def _parameter(key: str, spec: Any, path: Path) -> Parameter:
    from pylon.config import ConfigError

    where = f"{path}: parameter {key}"
    if key in SET_BY_SWEEP:
        raise ConfigError(f"{where}: the sweep sets {' and '.join(SET_BY_SWEEP)} of each trial itself")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{values: [...]}} or "
                          "{distribution: uniform, min: 0, max: 1}")
    if "parameters" in spec:
        raise ConfigError(f"{where}: nested parameters are not supported; use dotted keys such as train.lr")
    spec = dict(spec)
    kind = spec.pop("distribution", None)
    if kind is None:  # W&B's own choice when no distribution is named
        numbers = [spec.get("min"), spec.get("max")]
        kind = ("value" if "value" in spec else "values" if "values" in spec
                else "int_uniform" if all(isinstance(n, int) for n in numbers) else "uniform")
    kind = ALIASES.get(kind, kind)
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unsupported distribution {kind!r} (supported: {', '.join(DISTRIBUTIONS)})")
    required, optional = DISTRIBUTIONS[kind]
    if not required <= set(spec) <= required | optional:
        raise ConfigError(f"{where}: {kind} takes {', '.join(sorted(required | optional))}, got {', '.join(sorted(spec))}")
    if kind in ("value", "values"):
        choices = [spec["value"]] if kind == "value" else spec["values"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: values must be a non-empty list")
        # null would reach train.py as the text 'None'; a list is a fixed value, never an Optuna choice
        bad = [c for c in choices if not (isinstance(c, (bool, int, float, str)) or (kind == "value" and isinstance(c, list)))]
        if bad:
            raise ConfigError(f"{where}: values must be numbers, text or booleans, got {bad[0]!r}")
        return Parameter(key, kind, choices=list(choices))
    low, high, step = spec["min"], spec["max"], spec.get("q", 1 if kind == "q_uniform" else None)  # W&B's default q
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in (low, high, step or 1)):
        raise ConfigError(f"{where}: min, max and q must be numbers (YAML reads 1e-4 as text: write 1.0e-4)")
    if kind == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: int_uniform needs whole-number min and max, got {low} and {high}")
    if not low < high or (kind == "log_uniform_values" and low <= 0) or (step is not None and step <= 0):
        raise ConfigError(f"{where}: needs min < max (positive for log_uniform_values, q positive), got {low}, {high}")
    return Parameter(key, kind, low=low, high=high, step=step)


def _hyperband(spec: Any, path: Path) -> Optional[dict]:
    from pylon.config import ConfigError

    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "hyperband":
        raise ConfigError(f"{path}: early_terminate must be {{type: hyperband, min_iter: N}}")
    unknown = sorted(set(spec) - {"type", "min_iter", "eta"})
    if unknown:
        raise ConfigError(f"{path}: unsupported early_terminate keys: {', '.join(unknown)} (use min_iter and eta)")
    min_iter, eta = spec.get("min_iter"), spec.get("eta", 3)
    if not (isinstance(min_iter, int) and min_iter >= 1 and isinstance(eta, int) and eta >= 2):
        raise ConfigError(f"{path}: early_terminate needs min_iter >= 1 and eta >= 2, got {min_iter} and {eta}")
    return {"min_iter": min_iter, "eta": eta}


def _command(command: Any, path: Path) -> tuple[str, list[str]]:
    """The --config and fixed --set values of the W&B command, checked to reach train.py as --set key=value."""
    from pylon.config import ConfigError

    usage = (f"{path}: command must run train.py with the parameters as --set values: "
             f"[${{env}}, ${{interpreter}}, ${{program}}, --config, NAME.yaml, --set, {ARGS_MACRO}]")
    tokens = [str(t) for t in command] if isinstance(command, list) else []
    if "${program}" not in tokens or ARGS_MACRO not in tokens:
        raise ConfigError(usage)
    args = tokens[tokens.index("${program}") + 1:]
    at = args.index(ARGS_MACRO)
    option = next((a for a in reversed(args[:at]) if a.startswith("--")), None)
    if option != "--set":
        raise ConfigError(usage)
    parser = argparse.ArgumentParser(add_help=False)
    cli.add_config_args(parser, required=False)
    known, unknown = parser.parse_known_args(args)  # the macro stands in for the sampled key=value items
    if unknown or not known.config:
        raise ConfigError(f"{usage} (got {' '.join(args)})")
    return known.config, [item for item in known.overrides if item != ARGS_MACRO]


# --------------------------------------------------------------------------- running it


def check_parameters(space: Space, config: str, base_overrides: list[str]) -> None:
    """Every key and the extremes of its range through the config loader, on top of everything a
    trial sets besides, before the first trial: a typo or an impossible value fails here, by name."""
    from pylon.config import ConfigError, load_config

    for parameter in space.parameters.values():
        for value in parameter.extremes():
            try:
                load_config(config, [*base_overrides, as_override(parameter.key, value)])
            except ConfigError as err:  # the loader calls the value a --set; here it is the file's
                raise ConfigError(f"{space.path}: {str(err).removeprefix('--set: ')}") from None


def run_sweep(space: Space, config: str, overrides: list[str], trials: int, out: Optional[str] = None,
              seed: int = 0) -> dict[str, Any]:
    """Run ``trials`` more trials of ``space`` on ``config``; the sweep folder, study, table and best trial."""
    import optuna

    from pylon.config import ConfigError, load_config, resolve_config_path
    from pylon.engine import TrainingDiverged
    from pylon.runs import check_writable, new_run

    swept = {k for k, p in space.parameters.items() if not p.fixed}
    clash = [item.split("=", 1)[0].strip() for item in overrides if item.split("=", 1)[0].strip() in swept]
    if clash:
        raise ConfigError(f"--set {clash[0]} is swept by {space.path}; set it there (value: ...) or leave it out")
    fixed = [as_override(k, p.choices[0]) for k, p in space.parameters.items() if p.fixed]
    base_overrides = [*space.command_overrides, *fixed, *overrides]
    check_parameters(space, config, base_overrides)
    base = load_config(config, base_overrides)
    if out:
        check_writable(out, "--out")
    else:
        check_writable(base.logging.runs_dir)
    setup = {"config": str(resolve_config_path(config).resolve()), "overrides": base_overrides, "space": space.raw}
    sweep_dir = Path(out) if out else new_run(Path(base.logging.runs_dir) / "sweeps", base.name).root
    if sweep_dir.exists() and not (sweep_dir / JOURNAL).is_file() and (
            not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise ConfigError(f"--out {sweep_dir} is not a sweep folder (no {JOURNAL} in it)")
    sweep_dir.mkdir(parents=True, exist_ok=True)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line below, tracebacks none
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / JOURNAL)))
    study = optuna.create_study(storage=storage, study_name=STUDY, direction=space.goal,
                                pruner=make_pruner(space, base), load_if_exists=True)
    stored = study.user_attrs.get("setup")
    if stored is None:
        study.set_user_attr("setup", setup)
    elif stored != setup:
        changed = [k for k in setup if stored.get(k) != setup[k]]
        raise ConfigError(f"{sweep_dir} was started with other {' and '.join(changed)}: continue it with "
                          f"--config {stored['config']} and the same --space and --set")
    # Seeded past the trials already run: a continued random search must not repeat them.
    study.sampler = make_sampler(space, seed + len(study.trials))
    objective = Objective(space, config, base_overrides, base.name, sweep_dir)
    errors = (TrainingDiverged, ConfigError, _out_of_memory())
    try:
        study.optimize(objective, n_trials=trials, catch=errors, callbacks=[objective.report], gc_after_trial=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue the sweep with: python tools/sweep.py --space {shlex.quote(str(space.path))} "
              f"--out {shlex.quote(str(sweep_dir))} --trials N (and the same --config/--set)", file=sys.stderr)
        raise
    finally:
        table = write_table(study, space, base, sweep_dir / "sweep.csv")
    print(format_table(table))
    best = None
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        best = study.best_trial
        write_best_config(Path(best.user_attrs["run"]), base, sweep_dir / "best.yaml")
    return {"sweep": sweep_dir, "study": study, "table": table, "best_trial": best}


def _out_of_memory() -> type[Exception]:
    import torch

    return torch.OutOfMemoryError  # a batch or image size too big for the GPU ends that trial only


def make_sampler(space: Space, seed: int) -> Any:
    import optuna

    if space.method == "grid":
        grid = {k: p.choices for k, p in space.parameters.items() if not p.fixed}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if space.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(space: Space, base: Any) -> Any:
    """Hyperband over epochs as W&B's early_terminate (rungs at min_iter * eta^k), else the median rule."""
    import optuna

    if space.hyperband is None:
        return optuna.pruners.MedianPruner()
    epochs_swept = "train.epochs" in space.parameters and not space.parameters["train.epochs"].fixed
    epochs = "auto" if epochs_swept else max(int(base.train.epochs), space.hyperband["min_iter"])
    return optuna.pruners.HyperbandPruner(min_resource=space.hyperband["min_iter"], max_resource=epochs,
                                          reduction_factor=space.hyperband["eta"])


class Objective:
    """One trial: its config through the loader, a normal run by the engine, pruned on the metric."""

    def __init__(self, space: Space, config: str, base_overrides: list[str], name: str, sweep_dir: Path):
        self.space, self.config, self.base_overrides = space, config, base_overrides
        self.name, self.sweep_dir = name, sweep_dir

    def __call__(self, trial: Any) -> float:
        import optuna

        from pylon.config import ConfigError, load_config
        from pylon.engine import PRUNED, fit

        name = f"{self.name}-trial{trial.number:03d}"
        sampled = [as_override(k, p.suggest(trial)) for k, p in self.space.parameters.items() if not p.fixed]
        values: list[float] = []

        def on_epoch(epoch: int, row: dict) -> bool:
            values.append(float(row[self.space.metric]))
            trial.report(values[-1], epoch)
            return trial.should_prune()

        try:
            cfg = load_config(self.config, [*self.base_overrides, *sampled,
                                            f"name={name}", f"logging.runs_dir={self.sweep_dir}"])
            summary = fit(cfg, on_epoch=on_epoch)
        except Exception as err:
            trial.set_user_attr("error", str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise
        finally:
            finite = [v for v in values if math.isfinite(v)]
            best = (min if self.space.goal == "minimize" else max)(finite) if finite else None
            run = next(iter(sorted(self.sweep_dir.glob(f"{glob.escape(name)}-*"))), None)
            trial.set_user_attr("best", best)
            trial.set_user_attr("epochs", len(values))
            trial.set_user_attr("run", None if run is None else str(run))
        if summary["stop_reason"] == PRUNED:
            raise optuna.TrialPruned(f"pruned after epoch {len(values)}")
        if best is None:
            raise ConfigError(f"{self.space.metric} was never finite (e.g. AUROC on a one-class validation split)")
        return best

    def report(self, study: Any, trial: Any) -> None:
        """One line per finished trial, as the study records it."""
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        best, epochs = trial.user_attrs.get("best"), trial.user_attrs.get("epochs", 0)
        line = f"trial {trial.number} {trial.state.name}"
        if best is not None:
            line += f": {self.space.metric} {best:.4f}"
        line += f" after {epochs} epoch{'s' * (epochs != 1)} ({params})"
        if trial.user_attrs.get("error"):
            line += f": {trial.user_attrs['error']}"
        print(line, flush=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_table(study: Any, space: Space, base: Any, path: Path) -> Any:
    """sweep.csv: one row per trial (number, state, every parameter, best metric, epochs, run, error)."""
    import pandas as pd
    from omegaconf import OmegaConf

    rows = []
    for trial in study.trials:
        row = {"number": trial.number, "state": trial.state.name}
        for key, parameter in space.parameters.items():  # a fixed value as trained: --set may have changed it
            value = OmegaConf.select(base, key) if parameter.fixed else trial.params.get(key)
            row[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        row[f"best_{space.metric}"] = trial.user_attrs.get("best")
        row.update({k: trial.user_attrs.get(k) for k in ("epochs", "run", "error")})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False)
    return table


def format_table(table: Any) -> str:
    """The summary table: run folders by name, no error texts (each trial's line gave it)."""
    if table.empty:
        return "no trials"
    shown = table.drop(columns=["error"]).assign(run=table["run"].map(lambda r: Path(r).name if isinstance(r, str) else ""))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def write_best_config(run: Path, base: Any, path: Path) -> None:
    """The best run's config.yaml, named and placed like the base config so that training it makes a normal run."""
    from pylon.config import load_config, to_yaml

    cfg = load_config(run / "config.yaml", [f"name={base.name}", f"logging.runs_dir={base.logging.runs_dir}"])
    path.write_text(to_yaml(cfg))


if __name__ == "__main__":
    cli.run(main)

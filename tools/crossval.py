"""Cross-validate a config: python tools/crossval.py --config NAME [--folds 5] [--seeds 1] [--set k=v ...] [--resume CV_DIR]

One ordinary run per fold (``data.folds=K data.fold=i``), each evaluated with ``evaluate.py --localization``, and
every fold's test images pooled into ``<runs_dir>/<name>-cv<K>-<time>/eval/`` (metrics.json with intervals over
patients and ``per_fold``, predictions.csv, localization.csv), each scored by the model that never saw its patient.
With ``--seeds N`` each fold trains N runs (``train.seed`` + 0..N-1) and is scored as their seed ensemble (a
``fold<i>-seeds<N>`` folder with ``ensemble.json``: mean probability and mean heatmap), so that the pool measures
the recipe, not one draw.
The folder (fold runs, crossval.json) is also the fold models as one ensemble, for data outside the folds:
``evaluate.py --run CV_DIR --localization --set data.roots.rsna=/other eval.split=all --out DIR``, ``predict.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from pylon import cli
from pylon.config import ConfigError, load_config
from pylon.data.sources import SOURCES
from pylon.runs import RunPaths, new_run

ROOT = Path(__file__).resolve().parent.parent


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_config_args(parser, required=False)
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per fold, scored as one ensemble (default 1)")
    parser.add_argument("--resume", metavar="CV_DIR", help="finish the missing folds of an earlier cross-validation")
    parser.add_argument("--bootstrap", type=int, help="resamples of the pooled intervals (default: eval.bootstrap)")
    args = parser.parse_args(argv)
    if bool(args.resume) == bool(args.config):
        raise ConfigError("give --config NAME for a new cross-validation or --resume CV_DIR to finish one")
    if args.resume:
        folder = RunPaths(args.resume)
        if not folder.crossval.is_file():
            raise ConfigError(f"{folder.root} is not a cross-validation folder (no {folder.crossval.name})")
        plan = json.loads(folder.crossval.read_text())
    else:
        if args.folds < 2 or args.seeds < 1:
            raise ConfigError(f"--folds must be at least 2 and --seeds at least 1, got {args.folds}, {args.seeds}")
        cfg = load_config(args.config, [*args.overrides, f"data.folds={args.folds}"])  # fails here, not in fold 1
        folder = new_run(cfg.logging.runs_dir, f"{cfg.name}-cv{args.folds}")
        plan = {"config": args.config, "folds": args.folds, "overrides": list(args.overrides), "runs": {}}
        if args.seeds > 1:
            plan.update(seeds=[cfg.train.seed + i for i in range(args.seeds)], members={})
        _write_json(folder.crossval, plan)
    for fold in range(plan["folds"]):
        run_fold(folder, plan, fold)
    # the recipe, as fold 0 ran it: evaluate.py and predict.py read the folder as one ensemble
    shutil.copyfile(RunPaths(plan["runs"]["0"]).config, folder.config)
    cfg = load_config(folder.config, stored=True)
    n_boot = cfg.eval.bootstrap if args.bootstrap is None else args.bootstrap
    metrics = pool(folder, [RunPaths(plan["runs"][str(f)]) for f in range(plan["folds"])], n_boot, cfg.train.seed)
    print(pooled_tables(metrics))
    print(f"\n{folder.eval_dir / 'metrics.json'}")
    return 0


def _write_json(path: Path, content: Any) -> None:
    """``content`` as JSON at ``path``, written beside it and renamed: never read half-written."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)


def _script(name: str, *args: str) -> str:
    """``python NAME ARGS`` in the repository root, its output passed through as it comes; its last line."""
    last = ""
    with subprocess.Popen([sys.executable, str(ROOT / name), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            last = line.strip() or last
    if child.returncode != 0:
        raise SystemExit(child.returncode)
    return last


def run_fold(folder: RunPaths, plan: dict, fold: int) -> None:
    """Train (or resume) and evaluate fold ``fold`` unless its evaluation is already there."""
    run = plan["runs"].get(str(fold))
    if run is not None and (RunPaths(run).eval_dir / "metrics.json").is_file():
        return
    print(f"=== fold {fold + 1} of {plan['folds']}", flush=True)
    if "seeds" not in plan:
        plan["runs"][str(fold)] = train_fold(folder, plan, fold, run, [])
    else:
        members = plan["members"].setdefault(str(fold), [])
        for i, seed in enumerate(plan["seeds"]):
            previous = members[i] if i < len(members) else None
            trained = train_fold(folder, plan, fold, previous, [f"train.seed={seed}"])
            members[i:i + 1] = [trained]
            _write_json(folder.crossval, plan)
        plan["runs"][str(fold)] = str(seed_ensemble(folder.root / f"fold{fold}-seeds{len(members)}",
                                                    [RunPaths(m) for m in members]).root)
    _write_json(folder.crossval, plan)
    _script("evaluate.py", "--run", plan["runs"][str(fold)], "--localization")


def train_fold(folder: RunPaths, plan: dict, fold: int, run: Optional[str], extra: list[str]) -> str:
    """A new run of fold ``fold`` (the plan's overrides, then ``extra``), or ``run`` resumed; its folder."""
    if run is not None and RunPaths(run).last.is_file():
        _script("train.py", "--resume", run)
        return run
    fold_set = [f"data.folds={plan['folds']}", f"data.fold={fold}", f"logging.runs_dir={folder.root}",
                f"logging.group={folder.root.name}"]
    return json.loads(_script("train.py", "--config", plan["config"], "--set", *plan["overrides"], *extra, *fold_set))["run"]


def seed_ensemble(root: Path, runs: Sequence[RunPaths]) -> RunPaths:
    """A folder that evaluate.py and predict.py read as ``runs``' ensemble, with the first run's split:
    evaluate.py scores it on that split once it has checked that every run shares it."""
    folder = RunPaths(root)
    root.mkdir(exist_ok=True)
    shutil.copyfile(runs[0].config, folder.config)
    shutil.copyfile(runs[0].splits, folder.splits)
    _write_json(folder.ensemble, {"runs": [str(run.root) for run in runs]})
    return folder


def _fold_frames(runs: Sequence[RunPaths]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every fold's test predictions and localization rows, with the fold, patient and view of
    each; only the cross-validated sources' images: an official test split is the same in every
    fold, and pooling would count it k times (its numbers are under ``per_fold``)."""
    predictions, localization = [], []
    for fold, run in enumerate(runs):
        p = pd.read_csv(run.eval_dir / "predictions.csv", dtype={"id": str, "patient_id": str}, keep_default_na=False)
        p = p[(p.split == "test") & ~p.source.map(lambda s: SOURCES[s].OFFICIAL_TEST)].assign(fold=fold)
        predictions.append(p)
        lo = pd.read_csv(run.eval_dir / "localization.csv", dtype={"id": str})
        localization.append(lo.assign(fold=fold).merge(p[["id", "patient_id", "view"]], on="id", how="left"))
    return pd.concat(predictions, ignore_index=True), pd.concat(localization, ignore_index=True)


def _spread(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(array)), "sd": float(np.nanstd(array, ddof=1)) if len(array) > 1 else None,
            "values": [float(v) for v in array]}


def pool(folder: RunPaths, runs: Sequence[RunPaths], n_boot: int, seed: int) -> dict:
    """The pooled report of the fold runs, written to ``folder/eval``; returns metrics.json's content."""
    from pylon.evaluation import localization_report
    from pylon.metrics import LOCALIZATION_METRICS, POINTING_KEY, classification_section, jsonable

    predictions, localization = _fold_frames(runs)
    groups = {"source": predictions.source.to_numpy(str), "view": predictions.view.to_numpy(str)}
    pooled_sources = ", ".join(sorted(set(predictions.source)))
    # No Youden threshold: each fold chose its own on its own val split, so none belongs to the pool.
    classification = {"split": f"test of each of {len(runs)} folds, pooled ({pooled_sources})", **classification_section(
        predictions.label.to_numpy(), predictions.prob.to_numpy(np.float64), predictions.patient_id.to_numpy(str),
        groups, None, n_boot, seed)}
    columns = {"point_acc": "point_acc_hit", POINTING_KEY: f"{POINTING_KEY}_hit", "energy_in_box": "energy_in_box",
               "laterality_acc": "laterality_hit"}
    values, views, patients = {}, None, None
    for method, rows in localization.groupby("method", sort=False):
        values[method] = {k: rows[columns[k]].astype(np.float64).tolist() for k in LOCALIZATION_METRICS}
        views, patients = rows.view.fillna("").tolist(), rows.patient_id.tolist()  # the same images for every method
    fold_metrics = [json.loads((run.eval_dir / "metrics.json").read_text()) for run in runs]
    sources = sorted(fold_metrics[0]["classification"]["by_source"])
    per_fold = {"auroc": _spread([m["classification"]["auroc"] for m in fold_metrics]),
                "auroc_by_source": {s: _spread([m["classification"]["by_source"][s]["auroc"] for m in fold_metrics])
                                    for s in sources},
                **{key: {method: _spread([m["localization"][method][key] for m in fold_metrics]) for method in values}
                   for key in ("point_acc", "energy_in_box")}}
    metrics = jsonable({"run": str(folder.root), "split": "test",
                        "crossval": {"folds": len(runs), "runs": [str(r.root) for r in runs]},
                        "classification": classification,
                        "localization": localization_report(values, views, patients, n_boot, seed) if values else {},
                        "per_fold": per_fold})
    folder.eval_dir.mkdir(exist_ok=True)
    predictions.to_csv(folder.eval_dir / "predictions.csv", index=False)
    localization.to_csv(folder.eval_dir / "localization.csv", index=False)
    _write_json(folder.eval_dir / "metrics.json", metrics)
    return metrics


def pooled_tables(metrics: dict[str, Any]) -> str:
    from pylon.tables import localization_table

    c = metrics["classification"]
    lines = [f"{c['split']}: n={c['n']} ({c['n_pos']} positive), AUROC "
             f"{c['auroc']:.3f} [{c['ci']['auroc'][0]:.3f}, {c['ci']['auroc'][1]:.3f}] (95% CI over patients); "
             f"per fold {_fmt_spread(metrics['per_fold']['auroc'])}"]
    lines += [f"  {source} per fold: AUROC {_fmt_spread(spread)}"
              for source, spread in metrics["per_fold"]["auroc_by_source"].items()]
    for view, b in c["by_view"].items():
        lines.append(f"  {view}: n={b['n']} AUROC {b['auroc']:.3f} [{b['ci']['auroc'][0]:.3f}, {b['ci']['auroc'][1]:.3f}]")
    if metrics["localization"]:
        lines += ["", localization_table(metrics["localization"]), "", "point_acc per fold:"]
        lines += [f"  {method:<10} {_fmt_spread(s)}" for method, s in metrics["per_fold"]["point_acc"].items()]
    return "\n".join(lines)


def _fmt_spread(spread: dict) -> str:
    sd = "" if spread["sd"] is None else f" +- {spread['sd']:.3f}"
    return f"{spread['mean']:.3f}{sd} (" + ", ".join(f"{v:.3f}" for v in spread["values"]) + ")"


if __name__ == "__main__":
    cli.run(main)

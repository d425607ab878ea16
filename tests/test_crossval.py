"""tools/crossval.py: k ordinary fold runs whose test splits partition the patients, pooled into one report."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, quiet_wandb_env, tiny_overrides


def crossval(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **quiet_wandb_env(cwd / ".wandb-home")}
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "crossval.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_folds_score_every_rsna_film_once_and_resume_finishes_what_is_missing(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path / "runs", "train.epochs=1", "eval.bootstrap=50", "eval.n_overlays=1")
    done = crossval(["--config", "demo.yaml", "--folds", "2", "--set", *overrides], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "runs").iterdir()
    plan = json.loads((folder / "crossval.json").read_text())
    runs = [Path(plan["runs"][str(f)]) for f in range(2)]
    assert plan["folds"] == 2 and all(r.parent == folder and (r / "checkpoints" / "best.pt").is_file() for r in runs)

    def test_ids(run: Path, source: str) -> set[str]:
        with open(run / "splits.csv", newline="") as handle:
            return {row["id"] for row in csv.DictReader(handle) if row["split"] == "test" and row["source"] == source}

    rsna = [test_ids(r, "rsna") for r in runs]
    assert rsna[0] and rsna[1] and not rsna[0] & rsna[1] and len(rsna[0] | rsna[1]) == 16  # every film once
    assert test_ids(runs[0], "kaggle") == test_ids(runs[1], "kaggle")  # the official test split, in every fold

    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    fold_metrics = [json.loads((r / "eval" / "metrics.json").read_text()) for r in runs]
    # pooled: the cross-validated source's films, once each; Kaggle's official test is the same in every fold
    assert metrics["classification"]["n"] == 16 == sum(m["classification"]["by_source"]["rsna"]["n"] for m in fold_metrics)
    assert len(metrics["per_fold"]["auroc_by_source"]["kaggle"]["values"]) == 2
    assert metrics["classification"]["bootstrap_unit"] == "patient"
    assert {"pylon", "prior", "center"} <= set(metrics["localization"])
    boxed = sum(m["localization"]["pylon"]["n"] for m in fold_metrics)
    assert metrics["localization"]["pylon"]["n"] == boxed
    assert len(metrics["per_fold"]["point_acc"]["pylon"]["values"]) == 2
    assert "test of each of 2 folds, pooled (rsna): n=16" in done.stdout

    shutil.rmtree(runs[1] / "eval")
    shutil.rmtree(folder / "eval")
    again = crossval(["--resume", str(folder)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== fold 1 of 2" not in again.stdout and "=== fold 2 of 2" in again.stdout
    assert sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "eval") == sorted(r.name for r in runs)
    assert json.loads((folder / "eval" / "metrics.json").read_text())["classification"] == metrics["classification"]
    check_the_folder_is_an_ensemble(folder, runs, tmp_path)


def check_the_folder_is_an_ensemble(folder: Path, runs: list[Path], tmp_path: Path) -> None:
    """Mean probability and mean heatmap of the fold models, evaluable on other data only."""
    import pytest
    import torch

    from pylon.config import ConfigError
    from pylon.evaluation import evaluate_run
    from pylon.heatmaps import heatmaps
    from pylon.inference import load_run, probabilities
    from pylon.runs import RunPaths

    ensemble, members = load_run(RunPaths(folder)), [load_run(RunPaths(r)) for r in runs]
    images = torch.randn(3, 1, 64, 64)
    mean_prob = sum(probabilities(m.model, images, m.precision) for m in members) / 2
    assert probabilities(ensemble.model, images, ensemble.precision) == pytest.approx(mean_prob, abs=1e-6)
    mean_map = sum(heatmaps(m.model, images, "pylon", precision=m.precision) for m in members) / 2
    assert torch.allclose(heatmaps(ensemble.model, images, "pylon", precision=ensemble.precision), mean_map)
    assert torch.allclose(ensemble.prior, (members[0].prior + members[1].prior) / 2)
    with pytest.raises(ConfigError, match="is a cross-validation"):
        evaluate_run(RunPaths(folder), localization=True, out=tmp_path / "own")
    result = evaluate_run(RunPaths(folder), overrides=["eval.split=all", "eval.bootstrap=20", "eval.n_overlays=1",
                                                      "logging.wandb_mode=disabled"],
                          localization=True, out=tmp_path / "other")
    assert result.metrics["checkpoint"] == [str(r) for r in runs]
    assert {"pylon", "prior", "center"} <= set(result.metrics["localization"])


def test_seeds_score_each_fold_as_its_seed_ensemble_and_resume_trains_a_missing_seed(tiny_data, tmp_path):
    import pytest
    import torch

    from pylon.config import ConfigError
    from pylon.evaluation import evaluate_run
    from pylon.inference import load_run, member_runs, probabilities
    from pylon.runs import RunPaths

    overrides = tiny_overrides(tiny_data, tmp_path / "runs", "train.epochs=1", "train.seed=3", "eval.bootstrap=20",
                               "eval.n_overlays=1")
    done = crossval(["--config", "demo.yaml", "--folds", "2", "--seeds", "2", "--set", *overrides], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "runs").iterdir()
    plan = json.loads((folder / "crossval.json").read_text())
    assert plan["seeds"] == [3, 4]
    for fold in range(2):
        ensemble, members = RunPaths(plan["runs"][str(fold)]), [RunPaths(r) for r in plan["members"][str(fold)]]
        assert ensemble.root.name == f"fold{fold}-seeds2" and [r.root for r in member_runs(ensemble)] == [m.root for m in members]
        seeds = [load_run(m).cfg.train.seed for m in members]
        assert seeds == [3, 4] and members[0].splits.read_bytes() == members[1].splits.read_bytes() == ensemble.splits.read_bytes()
        assert json.loads((ensemble.eval_dir / "metrics.json").read_text())["checkpoint"] == [str(m.root) for m in members]
    images = torch.randn(2, 1, 64, 64)
    fold0 = [load_run(RunPaths(r)) for r in plan["members"]["0"]]
    mean = sum(probabilities(m.model, images, m.precision) for m in fold0) / 2
    ensemble = load_run(RunPaths(plan["runs"]["0"]))
    assert probabilities(ensemble.model, images, ensemble.precision) == pytest.approx(mean, abs=1e-6)
    assert len(member_runs(RunPaths(folder))) == 4  # the whole folder: every fold's every seed
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    assert metrics["classification"]["n"] == 16 and len(metrics["per_fold"]["point_acc"]["pylon"]["values"]) == 2

    mixed = tmp_path / "mixed"  # one run of each fold: they never shared a split, so no own test split exists
    shutil.copytree(plan["runs"]["0"], mixed, ignore=shutil.ignore_patterns("eval"))
    (mixed / "ensemble.json").write_text(json.dumps({"runs": [plan["members"]["0"][0], plan["members"]["1"][0]]}))
    with pytest.raises(ConfigError, match="not all trained on the split"):
        evaluate_run(RunPaths(mixed), localization=True, out=tmp_path / "mixed-eval")

    shutil.rmtree(plan["members"]["1"][1])  # killed before fold 2's second seed finished an epoch
    shutil.rmtree(Path(plan["runs"]["1"]) / "eval")
    shutil.rmtree(folder / "eval")
    again = crossval(["--resume", str(folder)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== fold 1 of 2" not in again.stdout and "nothing to resume" in again.stdout
    plan = json.loads((folder / "crossval.json").read_text())
    assert plan["members"]["1"][0] != plan["members"]["1"][1] and Path(plan["members"]["1"][1], "checkpoints", "best.pt").is_file()


def test_a_cross_validation_needs_a_config_or_a_folder_to_resume(tmp_path):
    done = crossval(["--resume", str(tmp_path)], tmp_path)
    assert done.returncode == 2 and "not a cross-validation folder" in done.stderr

"""bench/real_kaggle.sh, the command behind the real-data table in docs/RESULTS.md, end to end on a tiny
Kaggle-layout set: both configs train, evaluate on the official-style test split, and the
PYLON run predicts on RSNA-layout DICOMs with their boxes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO_ROOT, quiet_wandb_env

SCRIPT = REPO_ROOT / "bench" / "real_kaggle.sh"


def test_script_trains_evaluates_and_predicts_with_both_configs(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        **quiet_wandb_env(tmp_path / "wandb-home"),
        "PYTHON": sys.executable,
        "RUNS_DIR": str(runs),
        "RSNA_ROOT": str(tiny_data / "rsna"),
        "OMP_NUM_THREADS": "1",
    }
    overrides = ["--set", "data.image_size=64", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
                 "train.epochs=1", "train.batch_size=8", "logging.wandb_mode=disabled", "eval.bootstrap=20"]
    done = subprocess.run(["bash", str(SCRIPT), str(tiny_data / "kaggle"), *overrides], env=env,
                          capture_output=True, text=True, timeout=600)
    logs = sorted(runs.glob("real_kaggle-*.log"))
    assert done.returncode == 0, done.stderr[-2000:] + (logs[-1].read_text()[-3000:] if logs else "")
    assert len(logs) == 1

    results = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    assert [r["config"] for r in results] == ["kaggle224_pylon_r18.yaml", "kaggle224_baseline_r18.yaml"]
    n_test = len(list((tiny_data / "kaggle" / "chest_xray" / "test").rglob("*.jpeg")))
    for result, arch in zip(results, ("pylon", "baseline")):
        run = Path(result["run"])
        assert run.parent == runs and result["train_minutes"] >= 0
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["model"]["arch"], config["data"]["sources"]) == (arch, ["kaggle"])
        assert config["data"]["roots"]["kaggle"] == str(tiny_data / "kaggle")
        metrics = json.loads((run / "eval" / "metrics.json").read_text())["classification"]
        assert (metrics["split"], metrics["n"]) == ("test", n_test)

    pylon_run, baseline_run = (Path(r["run"]) for r in results)
    dicoms = sorted((tiny_data / "rsna" / "stage_2_train_images").glob("*.dcm"))
    with open(pylon_run / "predict" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["file"]).name for r in rows] == [d.name for d in dicoms]
    assert all(Path(r["overlay"]).is_file() and r["error"] == "" for r in rows)
    assert not (baseline_run / "predict").exists()

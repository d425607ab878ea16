"""bench/real_rsna.sh, the command behind the real localization tables in docs/RESULTS.md, end to end on
the tiny generated set: a merged PYLON run (one of the four configs, to keep the suite fast)
trains, evaluates with --localization, and the table sets its map beside the image-blind
baselines. Baseline runs go through the same evaluate.py (tests/test_evaluate.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT, quiet_wandb_env
from pylon.config import load_config

SCRIPT = REPO_ROOT / "bench" / "real_rsna.sh"
CONFIGS = ("real_rsna_pylon_r18", "real_rsna_baseline_r18", "real_merged_pylon_r18", "real_merged_baseline_r18",
           "real_rsna_pylon", "real_rsna_baseline", "real_merged_pylon", "real_merged_baseline")
RECOMMENDED = CONFIGS[4:]


@pytest.mark.parametrize("name", CONFIGS)
def test_real_configs_share_the_rsna_split_and_only_the_rsna_recipes_start_from_imagenet(name):
    cfg = load_config(f"{name}.yaml")
    if name in ("real_rsna_pylon", "real_rsna_baseline"):  # ImageNet MobileNetV2, its BN statistics kept, flips
        assert (cfg.model.backbone, cfg.model.weights, cfg.model.freeze) == ("mobilenet_v2", "imagenet", "bn")
        assert (cfg.data.augment.hflip, cfg.train.lr) == (0.5, 3e-4)
    else:
        assert cfg.model.weights is None and cfg.model.backbone == "resnet18"
    assert cfg.model.arch == ("baseline" if "baseline" in name else "pylon")
    assert list(cfg.data.sources) == (["rsna"] if "rsna_" in name else ["kaggle", "rsna"])
    # One RSNA split for all four (it depends on these alone), with 50+ boxed test films of 238.
    assert (cfg.data.test_fraction, cfg.data.val_fraction, cfg.data.split_seed) == (0.3, 0.1, 0)
    assert round(238 * cfg.data.test_fraction) >= 50
    if name in RECOMMENDED:  # split by person; merged: half the draws RSNA, selected on RSNA
        assert dict(cfg.data.patient_maps) == {"rsna": "nih_patient_map.csv"}
        merged = "merged" in name
        assert (dict(cfg.data.source_shares), cfg.train.select_on) == (
            ({"kaggle": 0.5, "rsna": 0.5}, "rsna") if merged else ({}, "pooled"))


@pytest.mark.parametrize("pylon", ["real_rsna_pylon", "real_merged_pylon"])
def test_each_recommended_baseline_is_its_pylons_twin(pylon):
    from pylon.config import to_dict

    twin = to_dict(load_config(pylon.replace("pylon", "baseline") + ".yaml"))
    recipe = to_dict(load_config(f"{pylon}.yaml"))
    for cfg in (twin, recipe):
        cfg.pop("name")
        cfg["model"].pop("arch")
        cfg["model"].pop("pooling")
    assert twin == recipe


def test_script_reads_imagenet_weights_from_pretrained_dir(tiny_data, tmp_path):
    """Offline, a recipe with model.weights=imagenet starts from <PRETRAINED_DIR>/<backbone>_imagenet.pt."""
    import torch
    from segmentation_models_pytorch.encoders import get_encoder

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(get_encoder("mobilenet_v2", in_channels=3, weights=None).state_dict(),
               weights / "mobilenet_v2_imagenet.pt")
    done, runs = _run_script(tiny_data, tmp_path, "real_rsna_pylon", PRETRAINED_DIR=str(weights))
    (run,) = runs.glob("real_rsna_pylon-*")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["weights"] == str(weights / "mobilenet_v2_imagenet.pt")
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pylon": str(run)}


def _run_script(tiny_data, tmp_path, configs: str, **extra_env) -> tuple[subprocess.CompletedProcess, object]:
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        **quiet_wandb_env(tmp_path / "wandb-home"),
        "PYTHON": sys.executable,
        "RUNS_DIR": str(runs),
        "CONFIGS": configs,
        "OMP_NUM_THREADS": "1",
        **extra_env,
    }
    overrides = ["--set", "data.image_size=64", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
                 "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8",
                 "logging.wandb_mode=disabled", "eval.bootstrap=20"]
    done = subprocess.run(["bash", str(SCRIPT), str(tiny_data / "kaggle"), str(tiny_data / "rsna"), *overrides],
                          env=env, capture_output=True, text=True, timeout=600)
    logs = sorted(runs.glob("real_rsna-*.log"))
    assert done.returncode == 0, done.stderr[-2000:] + (logs[-1].read_text()[-3000:] if logs else "")
    return done, runs


def test_script_trains_evaluates_and_tabulates(tiny_data, tmp_path):
    done, runs = _run_script(tiny_data, tmp_path, "real_merged_pylon")
    (run,) = runs.glob("real_merged_pylon-*")
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"merged_pylon": str(run)}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["sources"] == ["kaggle", "rsna"]
    assert config["data"]["roots"]["rsna"] == str(tiny_data / "rsna")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["localization"]) == {"pylon", "prior", "center"}
    assert set(metrics["classification"]["by_source"]) == {"kaggle", "rsna"}
    table = done.stdout[done.stdout.index("| run | method"):]
    for method in ("pylon", "prior", "center"):
        assert f"| real_merged_pylon | {method} | all |" in table
    source_alone = table.splitlines()[-2].split("|")[8].strip()
    assert 0.0 <= float(source_alone) <= 1.0

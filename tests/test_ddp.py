"""train.py under a real 2-process torchrun launch (gloo on CPU) behaves like one process:
same optimizer steps per epoch for the same global batch, one run folder written once by
rank 0, every val image scored once, and --resume works under torchrun too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch.distributed as dist

from conftest import TRAIN_PY, quiet_wandb_env, run_folders, tiny_overrides
from pylon.checkpoint import load_checkpoint
from pylon.runs import RunPaths

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **quiet_wandb_env(cwd / ".wandb-home")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TRAIN_PY), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one_process(tiny_run, tiny_data, tmp_path):
    runs = tmp_path / "runs"
    done = torchrun(["--config", "demo.yaml", "--set", *tiny_overrides(tiny_data, runs)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    (root,) = run_folders(runs)  # the ranks agreed on one folder; rank 1 made none
    run = RunPaths(root)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.pt", "last.pt"]  # no temp files left
    assert pd.read_csv(run.history)["epoch"].tolist() == [1, 2]
    assert done.stdout.count("best epoch") == 1  # only rank 0 prints the summary

    single = load_checkpoint(RunPaths(tiny_run).last)["loop"]
    double = load_checkpoint(run.last)["loop"]
    # Global batch 8 = 4 per process: the same number of optimizer steps as one process.
    assert double["global_step"] == single["global_step"] and double["epoch"] == 2
    # Validation is sharded without padding and gathered: every val image counted once.
    assert load_checkpoint(run.best)["val_metrics"]["n"] == load_checkpoint(RunPaths(tiny_run).best)["val_metrics"]["n"]

    done = torchrun(["--resume", str(run.root), "--set", "train.epochs=3"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_folders(runs) == [root]
    resumed = load_checkpoint(run.last)["loop"]
    assert resumed["epoch"] == 3 and resumed["global_step"] == 3 * single["global_step"] // 2
    assert pd.read_csv(run.history)["epoch"].tolist() == [1, 2, 3]


def test_one_named_gpu_for_every_process_is_refused(monkeypatch):
    from pylon.config import ConfigError
    from pylon.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.device=cuda:1 would put every process on one GPU"):
        init_distributed("cuda:1")

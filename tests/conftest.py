"""Shared fixtures: where the real data samples live, and synthetic radiograph-like pixels."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process training and inference share two cores with the other test worker: a second
    torch thread would only fight it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def realdata_root() -> Path:
    """The real data samples: $PYLON_REALDATA, else ../shared/realdata beside the repository."""
    override = os.environ.get("PYLON_REALDATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    root = realdata_root()
    if not root.is_dir():
        pytest.skip(f"real data samples not present at {root}")
    return root


@pytest.fixture(scope="session")
def rsna_sample(realdata: Path) -> Path:
    root = realdata / "rsna_sample"
    if not root.is_dir():
        pytest.skip(f"RSNA sample not present at {root}")
    return root


@pytest.fixture(scope="session")
def kermany(realdata: Path) -> Path:
    root = realdata / "kermany_224"
    if not root.is_dir():
        pytest.skip(f"Kaggle (Kermany) sample not present at {root}")
    return root


def make_phantom(height: int = 48, width: int = 64, max_value: int = 255, dtype=np.uint8) -> np.ndarray:
    """A smooth chest-like test image (two dark lungs in a bright body) spanning 0..max_value.

    Smooth so that JPEG error stays small, with exact 0 and max_value pixels so that range
    scaling is fully exercised.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    body = 0.6 + 0.4 * np.sin(np.pi * yy / (height - 1))
    lungs = np.zeros_like(body)
    for centre_x in (0.3 * width, 0.7 * width):
        lungs += np.exp(-(((xx - centre_x) / (0.15 * width)) ** 2 + ((yy - 0.5 * height) / (0.3 * height)) ** 2))
    image = np.clip(body - 0.5 * lungs, 0, None)
    image = (image - image.min()) / (image.max() - image.min())
    return np.rint(image * max_value).astype(dtype)


@pytest.fixture
def phantom() -> Callable[..., np.ndarray]:
    return make_phantom


def load_script(name: str):
    """A script (train.py, evaluate.py, predict.py, tools/*.py) imported as a module, so tests
    can call its ``main(argv)`` and functions in-process."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Training runs: a tiny generated data set, the train.py command line, W&B's own reader

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO_ROOT / "train.py"


def quiet_wandb_env(home: Path) -> dict[str, str]:
    """Environment that keeps W&B offline, silent, and its caches/staging under ``home``."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_SILENT": "true",
    }
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(home / name.lower())
    return env


def read_wandb_records(wandb_dir: Path) -> list[dict]:
    """Every record of a run's .wandb transaction log, decoded by wandb itself."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small generated demo set (``<dir>/kaggle``, ``<dir>/rsna``): 26 Kaggle-style films of 16
    children and 16 RSNA-style DICOMs; its 64 px cache goes to ``<dir>/../cache`` (see ``tiny_overrides``)."""
    root = tmp_path_factory.mktemp("tiny") / "demo"
    load_script("tools/make_demo").generate_demo(root, n_kaggle_patients=16, n_rsna=16, progress=False)
    return root


def tiny_overrides(data_root: Path, runs_dir: Path, *extra: str) -> list[str]:
    """``--set`` values for a run of seconds on ``tiny_data`` (later values win)."""
    return [
        "data.image_size=64",
        f"data.roots.kaggle={data_root / 'kaggle'}",
        f"data.roots.rsna={data_root / 'rsna'}",
        f"data.cache_dir={data_root.parent / 'cache'}",
        "data.num_workers=0",
        "train.epochs=2",
        "train.batch_size=8",
        "train.scheduler=plateau",  # the reference schedule (demo.yaml has none): resume and stop tests check its state
        "logging.wandb_mode=disabled",
        f"logging.runs_dir={runs_dir}",
        *extra,
    ]


def train_cli(args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> "subprocess.CompletedProcess[str]":
    """``python train.py ARGS`` run in ``cwd`` (a scratch folder: W&B's caches go there too),
    with one torch thread."""
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **quiet_wandb_env(Path(cwd) / ".wandb-home"), **(env or {})}
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_folders(runs_dir: Path) -> list[Path]:
    return sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()) if Path(runs_dir).is_dir() else []


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory) -> Path:
    """A finished 2-epoch PYLON-R18 run at 64 px on ``tiny_data`` with offline W&B (train loss
    logged every step). Read-only: copy it before resuming or changing it."""
    work = tmp_path_factory.mktemp("tiny_run")
    overrides = tiny_overrides(tiny_data, work / "runs", "logging.wandb_mode=offline", "logging.log_every_steps=1")
    done = train_cli(["--config", "demo.yaml", "--set", *overrides], cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    (work / "train_stdout.txt").write_text(done.stdout)  # beside runs/, for tests of the summary
    (run,) = run_folders(work / "runs")
    return run

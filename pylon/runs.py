"""Where a run's files live, so train.py, evaluate.py and predict.py agree on one layout."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from pylon.config import ConfigError


class RunPaths:
    """``<run>/config.yaml``, ``checkpoints/{best,last}.pt``, ``history.csv`` and ``eval/``."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.checkpoints = self.root / "checkpoints"
        self.best, self.last = self.checkpoints / "best.pt", self.checkpoints / "last.pt"
        self.history = self.root / "history.csv"
        self.eval_dir = self.root / "eval"


def new_run(runs_dir: Union[str, Path], name: str) -> RunPaths:
    """A fresh folder ``<runs_dir>/<name>-<timestamp>`` (suffixed if two start in one second)."""
    base = Path(runs_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        root = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            root.mkdir()  # atomic: of two runs started together, one gets the next name
            return RunPaths(root)
        except FileExistsError:
            continue
    raise ConfigError(f"cannot find a free run folder name next to {base}")


def latest_run(runs_dir: Union[str, Path]) -> RunPaths:
    """The most recently started run that has a checkpoint (the one evaluate.py uses by default)."""
    runs = {p.parent.parent for p in Path(runs_dir).glob("*/checkpoints/*.pt")}
    if not runs:
        raise ConfigError(f"no trained runs in {runs_dir}/: train one first (python train.py --config ...) or pass --run")
    return RunPaths(max(runs, key=lambda p: (p.joinpath("config.yaml").stat().st_mtime, p.name)))


def find_run(run: Optional[Union[str, Path]], runs_dir: Union[str, Path] = "runs") -> RunPaths:
    """``run`` as given (a run folder), or the latest run when it is None."""
    if run is None:
        return latest_run(runs_dir)
    if not (Path(run) / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run folder (no config.yaml in it)")
    return RunPaths(run)

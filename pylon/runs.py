"""Where a run's files live, so train.py, evaluate.py and predict.py agree on one layout."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from pylon.config import ConfigError


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"


def new_run(runs_dir: Union[str, Path], name: str) -> RunPaths:
    """A fresh folder ``<runs_dir>/<name>-<timestamp>`` (suffixed if two start in one second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / f"{name}-{stamp}"
    root, n = base, 1
    while root.exists():
        n += 1
        root = base.with_name(f"{base.name}-{n}")
    root.mkdir(parents=True)
    return RunPaths(root)


def latest_run(runs_dir: Union[str, Path]) -> RunPaths:
    """The most recently started run that has a config (the one evaluate.py uses by default)."""
    runs = [p.parent for p in Path(runs_dir).glob("*/config.yaml")]
    if not runs:
        raise ConfigError(f"no runs in {runs_dir}/: train one first (python train.py --config ...) or pass --run")
    return RunPaths(max(runs, key=lambda p: (p.joinpath("config.yaml").stat().st_mtime, p.name)))


def find_run(run: Optional[Union[str, Path]], runs_dir: Union[str, Path] = "runs") -> RunPaths:
    """``run`` as given (a run folder), or the latest run when it is None."""
    if run is None:
        return latest_run(runs_dir)
    root = Path(run)
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"{root} is not a run folder (no config.yaml in it)")
    return RunPaths(root)

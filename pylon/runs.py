"""Where a run's files live, so train.py, evaluate.py and predict.py agree on one layout."""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from pylon import ConfigError


class RunPaths:
    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.checkpoints = self.root / "checkpoints"
        self.best, self.last = self.checkpoints / "best.pt", self.checkpoints / "last.pt"
        self.history = self.root / "history.csv"
        self.splits = self.root / "splits.csv"  # image ids per split: evaluation scores exactly these
        self.eval_dir = self.root / "eval"
        self.lock = self.root / "training.lock"  # "<host> <pid>" of the process training the run
        self.crossval = self.root / "crossval.json"  # only in a cross-validation folder (tools/crossval.py)
        self.ensemble = self.root / "ensemble.json"  # only in a folder of runs trained on one split (a seed ensemble)


def new_run(runs_dir: Union[str, Path], name: str) -> RunPaths:
    """A fresh folder ``<runs_dir>/<name>-<timestamp>`` (suffixed if two start in one second)."""
    base = Path(runs_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        root = base if n == 1 else base.with_name(f"{base.name}-{n}")
        with contextlib.suppress(FileExistsError):
            root.mkdir()  # atomic: of two runs started together, one gets the next name
            return RunPaths(root)
    raise ConfigError(f"cannot find a free run folder name next to {base}")


def find_run(run: Optional[Union[str, Path]], runs_dir: Union[str, Path] = "runs") -> RunPaths:
    """``run`` as given (a run folder), or else the most recently started run in ``runs_dir`` that has a checkpoint."""
    if run is None:
        runs = {p.parent.parent for p in Path(runs_dir).glob("*/checkpoints/*.pt")}
        if not runs:
            raise ConfigError(f"no trained runs in {runs_dir}/: train one first (python train.py --config ...) "
                              "or pass --run")
        return RunPaths(max(runs, key=lambda p: (p.joinpath("config.yaml").stat().st_mtime, p.name)))
    if not (Path(run) / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run folder (no config.yaml in it)")
    return RunPaths(run)


@contextlib.contextmanager
def training_lock(run: RunPaths) -> Iterator[None]:
    """Hold ``run.lock`` while this process trains ``run``. A lock left by a killed process refuses too,
    naming the file to delete: whether its holder still runs is the user's to say, not ours to guess."""
    try:
        with open(run.lock, "x") as file:  # exclusive creation is atomic: one process wins
            file.write(f"{socket.gethostname()} {os.getpid()}\n")
    except FileExistsError:
        holder = run.lock.read_text(errors="replace").strip() if run.lock.is_file() else ""
        raise ConfigError(f"{run.root} is being trained by another process ({holder or 'unknown'}); "
                          f"if no training of it is running, delete {run.lock}") from None
    try:
        yield
    finally:
        run.lock.unlink(missing_ok=True)  # gone already when a failed start removed its run folder


def check_writable(folder: Union[str, Path], name: str = "logging.runs_dir") -> None:
    """Fail before the data is loaded, and create nothing, when ``folder`` (set by ``name``) is not writable."""
    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fix = f"give {name} <a folder you can write>" if name.startswith("--") else \
            f"set --set {name}=<a folder you can write>"
        raise ConfigError(f"{name}={folder} is not writable ({existing} is not a writable folder); {fix}")


def absolute_roots(data_cfg: Any) -> None:
    data_cfg.cache_dir = os.path.abspath(data_cfg.cache_dir)
    data_cfg.roots = {name: os.path.abspath(root) for name, root in data_cfg.roots.items()}


@contextlib.contextmanager
def replacing_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into, which replaces ``out`` whole once written: an
    interrupted evaluation leaves the previous one as it was, never a mix of old and new files."""
    partial, previous = (out.with_name(f".{out.name}.{kind}-{os.getpid()}") for kind in ("partial", "previous"))
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if out.exists():
            os.rename(out, previous)
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def write_splits(path: Path, data: Any) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "source", "split", "label"])
        for split, rows in data.rows.items():
            writer.writerows((r.id, r.source, split, r.label) for r in (data.cache.records[i] for i in rows))


def check_splits(path: Path, data: Any, splits: Sequence[str], sources: Sequence[str]) -> None:
    """Stop unless ``splits`` of ``data`` hold exactly the images and labels of ``sources`` the run trained on."""
    with open(path, newline="") as handle:
        want = {(row["id"], row["split"], int(row["label"])) for row in csv.DictReader(handle)
                if row["split"] in splits and row["source"] in sources}
    have = {(r.id, split, r.label) for split in splits for r in data.records(split)}
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        example = (missing or extra)[0]
        raise ConfigError(
            f"the data no longer matches the run's split manifest {path}: {len(missing)} of its images are missing "
            f"or changed and {len(extra)} are new or changed (e.g. {example[0]} in {example[1]}); point the data "
            "roots at the data the run was trained on, or train a new run")

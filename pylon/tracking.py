"""Experiment tracking: Weights & Biases (offline unless credentials exist) plus history.csv.

``history.csv`` in the run directory is the record of truth: one row per epoch, written on
every ``log_epoch`` whatever happens to W&B. W&B is a convenience layer on top; any error it
raises is caught, reported once as a warning, and W&B is switched off for the rest of the
run so training never stops because of tracking.

Only rank 0 of a distributed job tracks; on other ranks every method is a no-op.

W&B x-axis: every logged row carries ``global_step`` (the optimizer step) and W&B is told
to plot all metrics against it, so per-step and per-epoch values share one axis and an
out-of-order call can never make W&B drop data.
"""
from __future__ import annotations

import csv
import math
import netrc
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

HISTORY_FILE = "history.csv"
EPOCH_COLUMN = "epoch"
STEP_METRIC = "global_step"
MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online", "auto": None, "": None}
DEFAULT_BOX_CLASS = {1: "pneumonia"}

ImageItem = tuple  # (image, heatmap | None, boxes, caption)


# --------------------------------------------------------------------------- mode


def has_wandb_credentials() -> bool:
    """True when an API key is in WANDB_API_KEY or ~/.netrc has an entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base_url).hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not netrc_path.is_file():
        return False
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str | None) -> str:
    """Turn a requested mode (None/"auto" = decide) into "online", "offline" or "disabled".

    Deciding: WANDB_MODE if set; otherwise "online" only with W&B credentials, else "offline".
    """
    requested = _normalise_mode(mode, "mode")
    if requested is not None:
        return requested
    from_env = _normalise_mode(os.environ.get("WANDB_MODE"), "WANDB_MODE")
    if from_env is not None:
        return from_env
    return "online" if has_wandb_credentials() else "offline"


def _normalise_mode(mode: str | None, source: str) -> str | None:
    if mode is None:
        return None
    value = str(mode).strip().lower()
    value = _MODE_ALIASES.get(value, value)
    if value is not None and value not in MODES:
        raise ValueError(f"{source}={mode!r}: W&B mode must be one of {', '.join(MODES)} or auto")
    return value


# --------------------------------------------------------------------------- tracker


class Tracker:
    """W&B run + local history for one training run (see module docstring).

    Usable as a context manager; leaving the block with an exception finishes the W&B run
    with a non-zero exit code.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        project: str,
        run_name: str | None,
        config: Mapping[str, Any] | None,
        mode: str | None = None,
        entity: str | None = None,
        rank: int = 0,
        resume: bool = False,
        run_id: str | None = None,
        tags: Sequence[str] | None = None,
        init_timeout: float = 90.0,
    ) -> None:
        """``resume=True`` continues the most recent W&B run found under ``run_dir`` (a new
        one if there is none); ``run_id`` names the W&B run to continue explicitly."""
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.is_main = self.rank == 0
        self.mode = resolve_mode(mode) if self.is_main else "disabled"
        self.disabled_reason: str | None = None if self.mode != "disabled" else "mode=disabled"
        self._run: Any = None
        self._wandb: Any = None
        self._wandb_dir: Path | None = None
        self._run_id: str | None = None
        self._last_step = 0
        self._history = _HistoryFile(self.run_dir / HISTORY_FILE)
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.mode != "disabled":
            if resume and run_id is None:
                run_id = latest_wandb_run_id(self.run_dir)
            self._start_wandb(project, run_name, config, entity, run_id, tags, init_timeout)

    # ----------------------------------------------------------------- W&B life cycle

    def _start_wandb(self, project, run_name, config, entity, run_id, tags, init_timeout) -> None:
        if self.mode == "offline":
            # wandb-core otherwise reports its own telemetry over the network, which an
            # offline run must never attempt (and which can stall on air-gapped machines).
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        try:
            import wandb
        except Exception as exc:  # not installed or broken install
            self._disable(f"cannot import wandb: {exc}")
            return
        self._wandb = wandb

        def start() -> Any:
            settings = wandb.Settings(silent=self.mode == "offline", init_timeout=init_timeout)
            run = wandb.init(
                project=project,
                entity=entity,
                name=run_name,
                config=dict(config or {}),
                dir=str(self.run_dir),
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
                tags=list(tags) if tags else None,
                job_type="train",
                # Independent of any other run in the process; we only use this run object.
                reinit="create_new",
                settings=settings,
            )
            run.define_metric(STEP_METRIC)
            run.define_metric("*", step_metric=STEP_METRIC)
            return run

        self._run = self._guard("wandb.init", start)
        if self._run is not None:
            self._run_id = self._run.id
            self._wandb_dir = self._guard(
                "wandb settings", lambda: Path(self._run.settings.sync_dir)
            )

    @property
    def active(self) -> bool:
        """True while W&B is receiving data."""
        return self._run is not None

    @property
    def wandb_run(self) -> Any:
        """The underlying ``wandb.Run`` (None when W&B is off), e.g. for ``watch``."""
        return self._run

    @property
    def run_id(self) -> str | None:
        """W&B run id (kept after ``finish``); pass it back as ``run_id`` when resuming."""
        return self._run_id

    @property
    def wandb_dir(self) -> Path | None:
        """Folder holding this run's W&B files (the argument for ``wandb sync``); kept after
        ``finish`` so it can be printed at the end. None if W&B never started."""
        return self._wandb_dir

    @property
    def history_path(self) -> Path:
        return self._history.path

    def _disable(self, reason: str) -> None:
        first = self.disabled_reason is None
        self.disabled_reason = reason
        run, self._run = self._run, None
        if first:
            warnings.warn(
                f"W&B tracking switched off ({reason}); training continues and "
                f"{self._history.path} is still written",
                RuntimeWarning,
                stacklevel=4,
            )
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def _guard(self, what: str, call, *args, **kwargs) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            self._disable(f"{what} failed: {type(exc).__name__}: {exc}")
            return None

    def _log(self, what: str, payload: dict[str, Any]) -> None:
        if self._run is not None:
            self._guard(what, self._run.log, payload)

    # ----------------------------------------------------------------- logging

    def log_step(self, step: int, **scalars: Any) -> None:
        """Per-optimizer-step scalars (train loss, lr, ...)."""
        if not self.is_main:
            return
        self._last_step = int(step)
        if self._run is None:
            return
        payload = {key: _scalar(value, key) for key, value in _flatten(scalars).items()}
        payload[STEP_METRIC] = self._last_step
        self._log("log_step", payload)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One row of per-epoch metrics: always to history.csv, and to W&B when active.

        Nested dicts are flattened with "/" ({"val": {"loss": 1}} -> "val/loss"). Logging an
        epoch that is already in the history (a resumed run repeating work) replaces that
        row and drops any later ones.
        """
        if not self.is_main:
            return
        if step is not None:
            self._last_step = int(step)
        row = {key: _scalar(value, key) for key, value in _flatten(metrics).items()}
        row.pop(EPOCH_COLUMN, None)
        self._history.append(int(epoch), row)
        if self._run is not None:
            self._log("log_epoch", {**row, EPOCH_COLUMN: int(epoch), STEP_METRIC: self._last_step})

    def log_images(
        self,
        key: str,
        items: Iterable[ImageItem],
        step: int | None = None,
        *,
        class_labels: Mapping[int, str] | None = None,
        alpha: float = 0.6,
        cmap: str = "jet",
    ) -> None:
        """Log example images with heatmap overlay and ground-truth boxes.

        Each item is ``(image, heatmap, boxes, caption)``: image uint8 (H, W) or (H, W, 3);
        heatmap None, a float map at any resolution (min-max scaled, colour-mapped and blended
        at up to ``alpha`` by pylon.plots.overlay), or a ready-made uint8 (h, w, 3) overlay; boxes a list of (x, y, w, h)
        in the image's pixels, optionally with a 5th value: the class id (default: the
        first key of ``class_labels``, {1: 'pneumonia'}).
        """
        if not self.is_main or self._run is None:
            return
        if step is not None:
            self._last_step = int(step)
        labels = dict(class_labels or DEFAULT_BOX_CLASS)
        # Bad input is the caller's bug and raises here; only wandb's own calls are guarded.
        prepared = [_prepare_image(item, labels, alpha, cmap) for item in items]
        images = self._guard(
            "log_images", lambda: [self._wandb.Image(pixels, **kw) for pixels, kw in prepared]
        )
        if images is not None:
            self._log("log_images", {key: images, STEP_METRIC: self._last_step})

    def log_table(self, key: str, dataframe: pd.DataFrame, step: int | None = None) -> None:
        """A pandas DataFrame as a W&B table (e.g. per-image predictions)."""
        if not self.is_main or self._run is None:
            return
        if step is not None:
            self._last_step = int(step)
        table = self._guard("log_table", lambda: self._wandb.Table(dataframe=dataframe))
        if table is not None:
            self._log("log_table", {key: table, STEP_METRIC: self._last_step})

    def log_artifact(
        self,
        path: str | os.PathLike,
        name: str,
        type: str = "model",
        aliases: Sequence[str] = ("best",),
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Upload a file (e.g. best.pt) as an artifact; only in online mode. True if logged."""
        if not self.is_main or self._run is None or self.mode != "online":
            return False
        path = Path(path)
        if not path.is_file():
            warnings.warn(
                f"artifact {path} does not exist; not uploaded", RuntimeWarning, stacklevel=2
            )
            return False
        safe_name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "artifact"

        def upload() -> bool:
            artifact = self._wandb.Artifact(safe_name, type=type, metadata=dict(metadata or {}))
            artifact.add_file(str(path))
            self._run.log_artifact(artifact, aliases=list(aliases))
            return True

        return bool(self._guard("log_artifact", upload))

    def summary(self, **values: Any) -> None:
        """Final / best values shown on the W&B run page."""
        if not self.is_main or self._run is None:
            return
        plain = {key: _scalar(value, key) for key, value in _flatten(values).items()}
        self._guard("summary", self._run.summary.update, plain)

    def finish(self, exit_code: int | None = None) -> None:
        """Close the W&B run (idempotent). history.csv needs no closing."""
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                self._disable(f"wandb finish failed: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


# --------------------------------------------------------------------------- history file


class _HistoryFile:
    """history.csv with a stable header: a new metric rewrites the file with all columns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._columns: list[str] | None = None

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return [EPOCH_COLUMN], []
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or [EPOCH_COLUMN]), list(reader)

    def append(self, epoch: int, row: Mapping[str, Any]) -> None:
        columns, rows = self._read()
        new_columns = [key for key in row if key not in columns]
        # Rows at or after this epoch come from an interrupted run now being resumed.
        stale = not all(_epoch_before(old, epoch) for old in rows)
        record = {EPOCH_COLUMN: epoch, **row}
        if not new_columns and not stale and rows:
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=columns).writerow(_csv_row(record))
            return
        kept = [old for old in rows if _epoch_before(old, epoch)]
        self._rewrite(columns + new_columns, [*kept, _csv_row(record)])

    def _rewrite(self, columns: list[str], rows: list[Mapping[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


_WANDB_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


def latest_wandb_run_id(run_dir: str | os.PathLike) -> str | None:
    """Id of the newest W&B run stored under ``run_dir/wandb`` (None if there is none)."""
    folder = Path(run_dir) / "wandb"
    if not folder.is_dir():
        return None
    found = [m for m in (_WANDB_RUN_FOLDER.match(p.name) for p in folder.iterdir()) if m]
    return max(found, key=lambda m: m.group(1)).group(2) if found else None


def read_history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """history.csv of a run (pass the run folder or the file) as a DataFrame."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training history (is this a run folder?)")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- helpers


def _prepare_image(
    item: ImageItem, labels: dict[int, str], alpha: float, cmap: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels to show and the wandb.Image keyword arguments (caption, pixel-domain boxes)."""
    if len(item) != 4:
        raise ValueError(
            f"image item must be (image, heatmap, boxes, caption), got {len(item)} values"
        )
    image, heatmap, boxes, caption = item
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
        )
    height, width = image.shape[:2]
    if heatmap is None:
        shown = image
    elif _is_rgb_uint8(heatmap):
        shown = np.asarray(heatmap)  # a ready-made overlay
    else:
        from pylon.plots import overlay  # matplotlib/OpenCV only when images are logged

        shown = overlay(image, heatmap, alpha=alpha, cmap=cmap, value_range=None)
    scale_x, scale_y = shown.shape[1] / width, shown.shape[0] / height
    box_data = []
    for box in boxes or ():
        x, y, w, h = (float(v) for v in box[:4])
        class_id = int(box[4]) if len(box) > 4 else next(iter(labels))
        box_data.append(
            {
                "position": {
                    "minX": x * scale_x,
                    "maxX": (x + w) * scale_x,
                    "minY": y * scale_y,
                    "maxY": (y + h) * scale_y,
                },
                "domain": "pixel",
                "class_id": class_id,
                "box_caption": labels.get(class_id, str(class_id)),
            }
        )
    kwargs: dict[str, Any] = {"caption": caption}
    if box_data:
        kwargs["boxes"] = {"ground_truth": {"box_data": box_data, "class_labels": labels}}
    return shown, kwargs


def _is_rgb_uint8(value: Any) -> bool:
    array = np.asarray(value)
    return array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _scalar(value: Any, key: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # 0-d tensor / numpy value
        value = value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{key}: expected a number or string, got {type(value).__name__}")


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    def blank_if_missing(value: Any) -> Any:
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return "" if missing else value

    return {key: blank_if_missing(value) for key, value in row.items()}


def _epoch_before(row: Mapping[str, Any], epoch: int) -> bool:
    try:
        return int(float(row.get(EPOCH_COLUMN))) < epoch
    except (TypeError, ValueError):
        return True  # a row without a readable epoch is kept as it is

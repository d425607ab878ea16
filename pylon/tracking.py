"""Experiment tracking: a W&B run beside ``history.csv``, the run's record of truth. Only rank 0 tracks.

W&B's mode is ``logging.wandb_mode``, else ``WANDB_MODE``, else online; when an online start fails (no
credentials, or no network after 15 s, not wandb's 90) the run is logged offline for ``wandb sync``.
A W&B error never stops training: tracking is switched off with one warning; history.csv goes on.
"""
from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
STEP = "global_step"  # every W&B row carries it, and every metric is plotted against it
ONLINE_INIT_TIMEOUT_S = 15  # how long an online start may wait for the server (WANDB_INIT_TIMEOUT overrides)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; a ``[low, high]`` interval becomes two keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            flat[f"{name}_low"], flat[f"{name}_high"] = value
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


class Tracker:
    """``log_epoch`` writes history.csv (always) and W&B (when active); ``log`` W&B only."""

    def __init__(self, run_dir: Path, logging_cfg: Any, *, config: Optional[dict] = None,
                 run_id: Optional[str] = None, job_type: str = "train", enabled: bool = True):
        run_dir = Path(run_dir)
        self.history = run_dir / "history.csv"
        self.run: Any = None
        self.mode, self.dir, self.id = "disabled", None, None  # W&B's mode, files folder and run id
        self.note: Optional[str] = None  # how W&B went, for the run's final summary
        if not enabled:
            return
        mode = None if logging_cfg.wandb_mode == "auto" else logging_cfg.wandb_mode
        if mode == "disabled" or (mode is None and os.environ.get("WANDB_MODE") == "disabled"):
            self.note = "W&B disabled"
            return
        try:
            import wandb
        except ImportError as err:
            self._off(f"cannot import wandb ({err})")
            return
        self._wandb = wandb
        start = dict(project=logging_cfg.project, entity=logging_cfg.entity, name=run_dir.name,
                     config=config, dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                     job_type=job_type, group=logging_cfg.group, reinit="create_new")
        self.run = self._start(mode, start)
        if self.run is None:
            return
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        # A run's summary val_loss is its best epoch's, what checkpointing (and a W&B sweep) selects on.
        self.run.define_metric("val_loss", step_metric=STEP, summary="min")
        self.run.define_metric("val_select_loss", step_metric=STEP, summary="min")  # train.select_on's, when not pooled
        self.id = self.run.id  # stored in the checkpoints, so a resumed run or its evaluation continues it
        self.mode = "offline" if self.run.settings._offline else "online"
        self.dir = Path(self.run.settings.sync_dir)
        self.note = f"W&B {self.mode}: {self.dir}"
        if self.mode == "offline":
            self.note += f" (upload: wandb sync {shlex.quote(str(self.dir))})"

    def _start(self, mode: Optional[str], start: dict) -> Any:
        """The W&B run in ``mode``, else offline with one line saying why; None if neither starts."""
        wandb = self._wandb
        # wandb's own init timeout waits 90 s for a server it cannot reach before giving up
        waited = os.environ.get("WANDB_INIT_TIMEOUT") or ONLINE_INIT_TIMEOUT_S
        try:
            return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=float(waited)), **start)
        except Exception as err:  # noqa: BLE001 - wandb raises many types (credentials, network, settings)
            if mode == "offline":
                self._off(f"wandb.init failed: {err}")
                return None
            if not (mode is None and isinstance(err, wandb.errors.UsageError)):  # auto without a login: just offline
                reason = " ".join(line.strip() for line in str(err).splitlines()[:3])  # pydantic names the field on line 2
                print(f"W&B could not start online within {waited} s ({reason}); logging offline instead "
                      "(on a slow network, set WANDB_INIT_TIMEOUT=<seconds>)", flush=True)
        try:
            return wandb.init(mode="offline", **start)
        except Exception as err:  # noqa: BLE001
            self._off(f"wandb.init failed: {err}")
            return None

    def _off(self, reason: str) -> None:
        log.warning("W&B tracking switched off (%s); history.csv is still written", reason)
        self.note, self.run = f"W&B off: {reason}", None

    def _call(self, fn: Callable[[], Any]) -> None:
        if self.run is not None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - tracking is never fatal
                self._off(f"{type(err).__name__}: {err}")

    def log(self, values: Mapping[str, Any], step: int) -> None:
        self._call(lambda: self.run.log({**flatten(values), STEP: step}))

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        """One history.csv row per epoch; rows of a resumed run's repeated epochs are replaced."""
        old = pd.read_csv(self.history) if self.history.is_file() else pd.DataFrame(columns=["epoch"])
        table = pd.concat([old[old["epoch"] < epoch], pd.DataFrame([{"epoch": epoch, **row}])], ignore_index=True)
        tmp = self.history.with_name(".history.csv.tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, self.history)
        self.log({**row, "epoch": epoch}, step)

    def log_images(self, key: str, images: Sequence[tuple[np.ndarray, str]], step: Optional[int] = None) -> None:
        """RGB uint8 images with captions (heatmap overlays are drawn by pylon.plots.overlay)."""
        at = {} if step is None else {STEP: step}
        self._call(lambda: self.run.log({key: [self._wandb.Image(image, caption=c) for image, c in images], **at}))

    def log_table(self, key: str, frame: pd.DataFrame) -> None:
        self._call(lambda: self.run.log({key: self._wandb.Table(dataframe=frame)}))

    def summary(self, values: Mapping[str, Any]) -> None:
        self._call(lambda: self.run.summary.update(flatten(values)))

    def log_artifact(self, path: Path, name: str) -> None:
        def upload() -> None:
            artifact = self._wandb.Artifact(name, type="model")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact, aliases=["best"])
        if self.mode == "online":
            self._call(upload)

    def finish(self, exit_code: int = 0) -> None:
        self._call(lambda: self.run.finish(exit_code=exit_code))
        self.run = None

"""Train a PYLON or baseline classifier: python train.py --config pylon_r50.yaml [--set k=v ...]

Writes runs/<name>-<timestamp>/ with config.yaml, checkpoints/{best,last}.pt, history.csv and
W&B files. Resume an interrupted run with --resume (the latest run under runs/) or
--resume runs/<name>; --set train.epochs=N extends a finished run.
Several GPUs: torchrun --nproc_per_node=N train.py --config ...
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
from typing import Any, Optional, Sequence

from pylon import cli

# What --set may change when a run is resumed; the rest (learning rate, data, model, ...) is held
# by the checkpoint's optimizer state or shaped what was trained, and would only be recorded.
RESUMABLE = ("train.epochs", "train.early_stop_patience", "train.device", "logging.")
# How the best-epoch line names the val loss that train.select_on chose it by.
SELECTED = {"pooled": "pooled val loss", "mean_sources": "mean of the sources' val losses"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_config_args(parser, required=False)
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                        help="continue a run from its checkpoints/last.pt (default: the latest run under runs/); "
                        "--set may change e.g. train.epochs")
    args = parser.parse_args(argv)
    if args.resume and args.config:
        parser.error("--resume continues a run with its own config.yaml; change values with --set, not --config")
    if not args.resume and not args.config:
        parser.error("give --config NAME (e.g. --config pylon_r50.yaml) or --resume")

    from pylon.config import LoggingConfig, load_config, restrict_overrides
    from pylon.runs import find_run

    run = None
    if args.resume:
        restrict_overrides(args.overrides, RESUMABLE, "in a resumed run",
                           "start a new run with --config to train with other settings")
        runs_dir = next((i.split("=", 1)[1] for i in reversed(args.overrides) if i.startswith("logging.runs_dir=")),
                        LoggingConfig.runs_dir)
        run = find_run(None if args.resume == "latest" else args.resume, runs_dir)
        cfg = load_config(run.config, args.overrides, stored=True)
    else:
        cfg = load_config(args.config, args.overrides)

    from pylon.distributed import is_main_process, shutdown_distributed
    from pylon.engine import fit
    from pylon.metrics import jsonable

    try:
        summary = fit(cfg, run)
    finally:
        shutdown_distributed()
    if is_main_process():
        print(format_summary(summary))
        print(json.dumps(jsonable(summary)))  # NaN (AUROC on a one-class split) as null
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """The lines train.py prints at the end: how it went and where everything is."""
    lines = [summary["note"]] if summary.get("note") else []
    if summary.get("best_epoch", -1) > 0:
        auroc = summary.get("best_val_auroc")
        auroc_text = "n/a" if auroc is None or not math.isfinite(auroc) else f"{auroc:.4f}"
        select_on = summary.get("select_on", "pooled")
        selected = SELECTED.get(select_on, f"{select_on} val loss")
        lines.append(f"best epoch {summary['best_epoch']} of {summary['epochs']}: {selected} "
                     f"{summary['best_val_loss']:.4f}, val AUROC {auroc_text}")
    if summary.get("stop_reason"):
        lines.append(f"stopped: {summary['stop_reason']}")
    lines += [f"best checkpoint: {summary['best_checkpoint']}",
              f"last checkpoint: {summary['last_checkpoint']} (resume: python train.py --resume "
              f"{shlex.quote(summary['run'])})",
              f"history: {summary['history']}"]
    if summary.get("wandb"):
        lines.append(summary["wandb"])
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)

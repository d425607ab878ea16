"""Learning-rate range test: python tools/lr_find.py --config X [--set k=v ...] [--start 1e-7] [--end 10] [--steps N]

A fresh model trains as train.py would (same data order, loss, optimizer and step) while the rate grows exponentially
from --start to --end over one epoch of at least 100 steps (the smoothed loss needs about 50 to mean anything), or
--steps, until the smoothed loss passes 4x its best; lr_find.csv/.png/.json and config.yaml go to
<runs_dir>/<name>-lrfind-<time>/. Suggested rate: where the smoothed loss falls fastest against log10(lr), leaving
out the first and last tenth of the points before the stop, where the average still settles or already turns up.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from pylon import cli
from pylon.config import ConfigError, load_config, to_yaml
from pylon.data.pipeline import split_loader
from pylon.device import bar_disabled, resolve_device
from pylon.distributed import Dist
from pylon.engine import setup, start_epoch, train_step
from pylon.runs import absolute_roots, check_writable, new_run
from pylon.trainstate import MAX_LOSS

BETA = 0.98  # loss smoothing: an exponential moving average over about 50 steps
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its best
MIN_STEPS = 100  # the default length when an epoch is shorter


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_config_args(parser, required=True)
    parser.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    parser.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps from --start to --end (default: one epoch, "
                                                   f"at least {MIN_STEPS})")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tools/lr_find.py runs one process: start it with python, not torchrun")
    if not 0 < args.start < args.end:
        raise ConfigError(f"--start must be positive and below --end, got --start {args.start:g} --end {args.end:g}")
    if args.steps is not None and args.steps < 2:
        raise ConfigError(f"--steps must be at least 2, got {args.steps}")
    cfg = load_config(args.config, args.overrides)
    result = lr_range_test(cfg, args.start, args.end, args.steps)
    run = result["run"]
    if result["suggested_lr"] is None:
        print("no suggestion: the loss diverged at the first step; lower --start")
    else:
        print(f"suggested lr: {result['suggested_lr']:.3g} (steepest descent; train.lr is {cfg.train.lr:.3g}, "
              f"the smoothed loss is lowest at {result['min_loss_lr']:.3g}); try --set train.lr={result['suggested_lr']:.2g}")
    print(f"{result['steps']} steps, " + ("stopped early: the loss diverged" if result["diverged"] else "no divergence"))
    for name in ("lr_find.csv", "lr_find.png", "lr_find.json", "config.yaml"):
        print(run.root / name)
    return 0


def lr_range_test(cfg: Any, start: float, end: float, steps: Optional[int] = None) -> dict[str, Any]:
    """Run the range test of ``cfg`` and write its run folder; lr_find.json's values plus ``run``."""
    d = Dist(device=resolve_device(cfg.train.device))
    check_writable(cfg.logging.runs_dir)
    absolute_roots(cfg.data)
    # fit()'s own setup and epoch-0 seeding: the first steps see train.py's weights and batches.
    model, data, optimizer, scaler, loss_fn = setup(cfg, d)
    loader = split_loader(data, "train", cfg.data, cfg.train.batch_size, train=True, seed=cfg.train.seed)
    per_epoch = min(len(loader), cfg.train.max_steps_per_epoch or len(loader))
    if per_epoch == 0:
        raise ConfigError(f"no training batch: train.batch_size={cfg.train.batch_size} is larger than "
                          f"the training split ({len(loader.dataset)} images)")
    run = new_run(cfg.logging.runs_dir, f"{cfg.name}-lrfind")
    run.config.write_text(to_yaml(cfg))
    if cfg.train.freeze_encoder_epochs:
        model.freeze_encoder(True)  # train.lr is the rate of the first, decoder-only stage
    train_model = torch.compile(model) if cfg.train.compile else model
    train_model.train()
    n = steps or max(per_epoch, MIN_STEPS)  # at least 2
    lrs = start * (end / start) ** (np.arange(n) / (n - 1))
    batches = epochs_of(loader, cfg.train, per_epoch)
    rows, diverged, before_stop = losses_at(lrs.tolist(), optimizer, lambda: float(
        train_step(train_model, next(batches), optimizer, loss_fn, scaler, d, cfg.train)))
    table = pd.DataFrame(rows, columns=["step", "lr", "loss", "smoothed"])
    usable = table.iloc[:before_stop]
    suggested, min_loss = suggest(usable["lr"].to_numpy(), usable["smoothed"].to_numpy())
    result = {"suggested_lr": suggested, "config_lr": float(cfg.train.lr), "min_loss_lr": min_loss,
              "steps": len(rows), "diverged": diverged}
    table.to_csv(run.root / "lr_find.csv", index=False)
    (run.root / "lr_find.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(table, usable, result, run.root / "lr_find.png")
    return {**result, "run": run}


def losses_at(lrs: list[float], optimizer: Any, step: Callable[[], float]) -> tuple[list[tuple], bool, Optional[int]]:
    """One ``step`` at each rate: the rows (step, lr, loss, smoothed loss), whether the loss diverged,
    and how many rows come before the stop (None: all)."""
    rows: list[tuple[int, float, float, float]] = []
    average, best = 0.0, math.inf
    with tqdm(total=len(lrs), desc="lr range test", disable=bar_disabled(True)) as bar:
        for i, lr in enumerate(lrs):
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = step()
            if not loss <= MAX_LOSS:  # NaN or a blown-up loss: the end of the test, not an error
                return rows, True, None
            average = BETA * average + (1 - BETA) * loss
            smoothed = average / (1 - BETA ** (i + 1))  # bias correction: the average starts at 0
            rows.append((i + 1, lr, loss, smoothed))
            bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed:.4f}")
            bar.update()
            if not math.isfinite(smoothed) or smoothed > DIVERGE_FACTOR * best:
                return rows, True, len(rows) - 1
            best = min(best, smoothed)
    return rows, False, None


def epochs_of(loader: Any, cfg_train: Any, per_epoch: int) -> Iterator[Any]:
    """train.py's batches, epoch after epoch, each epoch seeded as fit() seeds it."""
    for epoch in itertools.count():
        start_epoch(loader, cfg_train, epoch)
        yield from itertools.islice(loader, per_epoch)


def suggest(lrs: Any, smoothed: Any) -> tuple[Optional[float], Optional[float]]:
    """(the lr of steepest descent, the lr of the lowest smoothed loss); None for no points."""
    n = len(lrs)
    if n == 0:
        return None, None
    lowest = float(lrs[int(np.argmin(smoothed))])
    if n == 1:
        return float(lrs[0]), lowest
    slope = np.gradient(smoothed, np.log10(lrs))
    skip = max(1, n // 10) if n >= 5 else 0
    return float(lrs[skip + int(np.argmin(slope[skip:n - skip]))]), lowest


def plot(table: Any, usable: Any, result: dict[str, Any], path: Any) -> None:
    """Loss against lr on a log axis, the suggested and the configured rate marked."""
    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(table["lr"], table["loss"], color="0.7", linewidth=1, label="batch loss")
    ax.plot(table["lr"], table["smoothed"], linewidth=1.8, label="smoothed loss")
    if result["suggested_lr"] is not None:
        ax.axvline(result["suggested_lr"], color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"suggested {result['suggested_lr']:.2e}")
    ax.axvline(result["config_lr"], color="0.3", linestyle=":", linewidth=1.2, label=f"train.lr {result['config_lr']:.2e}")
    if len(usable):  # a diverging tail would squash the interesting part
        ax.set_ylim(0.9 * float(usable[["loss", "smoothed"]].min().min()), 1.2 * float(usable["smoothed"].max()))
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (BCE)",
           title="learning-rate range test" + (" (stopped: diverged)" if result["diverged"] else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")


if __name__ == "__main__":
    cli.run(main)

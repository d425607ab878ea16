"""Sustained PYLON-R50 training speed through the real loader vs the bare model.

Two ways to feed the same training step (pylon.engine.train_step: forward, BCE loss, loss read
back for the NaN check, backward, Adam step), alternating in one run (loader, bare, bare, loader, ...)
so load drifts hit both alike:
  loader  batches from pylon.data.pipeline.split_loader: the memory-mapped cache, the
          training augmentation, DataLoader workers, pinned copies to the device
  bare    one synthetic batch already on the device (the model's own rate)
The loader overhead is how much longer a loader-fed step takes: (loader / bare - 1) * 100 %.
Also timed: the same loader without workers, batch after batch, which is the CPU work the
workers take from the training process's cores (the noise-free part of the overhead).
Each loader round starts a fresh epoch as training does; the wait for its first batch
(worker start-up) is reported separately as epoch_start_s, since a real epoch of thousands of
steps pays it once. The step runs at the precision train.py chooses (pylon.device: autocast and
channels_last on CUDA and on CPUs with native bf16; --fp32 for fp32).

    python bench/train_speed.py --threads 2 --batch 8 --steps 4 --workers 2

Data: --kaggle-root / --rsna-root, else a demo set generated into a temporary folder. The last
line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pylon.config import load_config  # noqa: E402
from pylon.data.pipeline import PreparedData, split_loader, prepare_data, set_loader_epoch  # noqa: E402
from pylon.distributed import Dist  # noqa: E402
from pylon.engine import build_optimizer, train_step  # noqa: E402
from pylon.device import choose_precision, resolve_device  # noqa: E402
from pylon.models import build_model  # noqa: E402

TARGET_OVERHEAD_PCT = 10.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training process")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and feed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every round")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--size", type=int, default=256, help="image size (multiple of 32)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--fp32", action="store_true", help="train.amp=false: fp32 in the default layout")
    parser.add_argument("--kaggle-root", type=Path, help="folder holding chest_xray/{train,val,test}/...")
    parser.add_argument("--rsna-root", type=Path, help="folder holding stage_2_train_labels.csv and images")
    parser.add_argument("--cache-dir", type=Path, help="image cache folder (default: a temporary one)")
    return parser.parse_args()


def experiment_config(args: argparse.Namespace, scratch: Path):
    """The paper config with random weights and this benchmark's data, size and loader."""
    if args.kaggle_root is None and args.rsna_root is None:
        from pylon.demo import generate_demo

        print("generating a demo data set ...", flush=True)
        demo = generate_demo(scratch / "demo", n_kaggle_patients=24, n_rsna=24, progress=False)
        args.kaggle_root, args.rsna_root = demo / "kaggle", demo / "rsna"
    sources = [name for name, root in (("kaggle", args.kaggle_root), ("rsna", args.rsna_root)) if root]
    overrides = [
        "model.weights=null",
        f"data.sources=[{','.join(sources)}]",
        *(f"data.roots.{name}={root}" for name, root in (("kaggle", args.kaggle_root), ("rsna", args.rsna_root)) if root),
        f"data.cache_dir={args.cache_dir or scratch / 'cache'}",
        f"data.image_size={args.size}",
        f"data.num_workers={args.workers}",
        f"train.batch_size={args.batch}",
        f"train.device={args.device}",
        f"train.amp={not args.fp32}",
    ]
    return load_config("pylon_r50.yaml", overrides)


def long_epoch(data: PreparedData, images: int) -> PreparedData:
    """The training rows repeated so that one epoch holds ``images`` items: a small data set
    then behaves like a long epoch of a large one (same cache, same augmentation)."""
    rows = data.rows["train"]
    return PreparedData(data.cache, {**data.rows, "train": np.resize(rows, max(images, len(rows)))}, data.mean, data.std)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, device: torch.device) -> Callable[[dict], None]:
    """train.py's own optimizer step (pylon.engine.train_step), NaN check included."""
    scaler = torch.amp.GradScaler(device.type, enabled=choose_precision(device, cfg.train).needs_loss_scaling)
    loss_fn = nn.BCEWithLogitsLoss()
    d = Dist(device=device)

    def step(batch: dict) -> None:
        train_step(model, batch, optimizer, loss_fn, scaler, d, cfg.train, "benchmark", "none")

    return step


def timed_steps(step: Callable[[dict], None], batches: Iterator[dict], n: int) -> list[float]:
    """Seconds per step, each from asking for the batch to the end of the step."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step(next(batches))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("--warmup, --steps and --rounds must be at least 1")
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="train_speed-"))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> None:
    cfg = experiment_config(args, scratch)
    device = resolve_device(cfg.train.device)
    data = prepare_data(cfg.data, progress=False)
    per_round = (args.warmup + args.steps) * args.batch
    data = long_epoch(data, per_round)
    loader = split_loader(data, "train", cfg.data, args.batch, train=True, seed=0)
    # The same loader without workers: its time per batch is the CPU work the workers do.
    in_process_cfg = copy.deepcopy(cfg.data)
    in_process_cfg.num_workers = 0
    in_process = split_loader(data, "train", in_process_cfg, args.batch, train=True, seed=0)

    torch.manual_seed(0)
    model = choose_precision(device, cfg.train).layout(build_model(cfg.model).to(device))
    model.train()
    step = make_step(model, build_optimizer(model, cfg.train), cfg, device)
    first = next(iter(loader))
    synthetic = {
        "image": torch.randn_like(first["image"]).to(device),
        "label": torch.randint(0, 2, first["label"].shape).float().to(device),
    }

    def bare_batches() -> Iterator[dict]:
        while True:
            yield synthetic

    print(f"device {device}, threads {args.threads}, workers {args.workers}, batch {args.batch}, "
          f"{args.size} px, {len(data.rows['train'])} items per epoch", flush=True)
    times: dict[str, list[float]] = {"loader": [], "bare": []}
    epoch_start: list[float] = []
    batch_work: list[float] = []
    for round_ in range(args.rounds):
        set_loader_epoch(in_process, 0, round_)
        work = iter(in_process)
        batch_work += timed_steps(lambda batch: None, work, args.steps)
        del work
        order = ("loader", "bare") if round_ % 2 == 0 else ("bare", "loader")
        for feed in order:
            if feed == "loader":
                set_loader_epoch(loader, 0, round_)
                start = time.perf_counter()
                batches = iter(loader)
                batch = next(batches)  # waits for the workers to start
                epoch_start.append(time.perf_counter() - start)
                step(batch)
                for _ in range(args.warmup - 1):
                    step(next(batches))
            else:
                batches = bare_batches()
                for _ in range(args.warmup):
                    step(next(batches))
            times[feed] += timed_steps(step, batches, args.steps)
            del batches  # ends the epoch's workers before the other feed runs
        print(f"round {round_ + 1}/{args.rounds}: loader {statistics.median(times['loader']):.3f} s/step, "
              f"bare {statistics.median(times['bare']):.3f} s/step", flush=True)

    loader_s, bare_s = statistics.median(times["loader"]), statistics.median(times["bare"])
    overhead = (loader_s / bare_s - 1) * 100
    report = {
        "device": str(device),
        "threads": args.threads,
        "workers": args.workers,
        "batch": args.batch,
        "size": args.size,
        "precision": choose_precision(device, cfg.train).name,
        "timed_steps_per_feed": len(times["bare"]),
        "bare_s_per_step": round(bare_s, 4),
        "loader_s_per_step": round(loader_s, 4),
        "bare_img_per_s": round(args.batch / bare_s, 2),
        "loader_img_per_s": round(args.batch / loader_s, 2),
        "loader_overhead_pct": round(overhead, 2),
        "loader_over_bare_mean_ratio": round(statistics.mean(times["loader"]) / statistics.mean(times["bare"]), 4),
        "loader_over_bare_min_ratio": round(min(times["loader"]) / min(times["bare"]), 4),
        "step_times_s": {feed: [round(t, 3) for t in values] for feed, values in times.items()},
        "epoch_start_s": round(statistics.median(epoch_start), 3),
        "loader_work_s_per_batch": round(statistics.median(batch_work), 5),
        "loader_work_pct_of_step": round(statistics.median(batch_work) / bare_s * 100, 3),
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "within_target": overhead < TARGET_OVERHEAD_PCT,
    }
    print(f"loader overhead {overhead:+.1f}% (target < {TARGET_OVERHEAD_PCT:.0f}%): "
          f"{report['loader_img_per_s']} vs {report['bare_img_per_s']} img/s; the loader's own work is "
          f"{report['loader_work_s_per_batch'] * 1000:.1f} ms per batch ({report['loader_work_pct_of_step']:.2f}% of a step)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

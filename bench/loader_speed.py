"""The training loader against the step it feeds: the cache vs decoding the files, a loader-fed vs a bare step.

train.py's own setup, loader and step (pylon.engine.setup, pylon.data.pipeline.split_loader, pylon.engine.train_step)
on a config, by default demo.yaml (`make demo`) as PYLON-R50 at 256 px, batch 8. Each job times --steps batches of
a fresh epoch once its workers have started (their start-up is reported apart: a real epoch pays it once):
cached (the training loader: memory-mapped cache, augmentation, data.num_workers workers, no model), decode_<s>
(the same loader reading source <s>'s original files: what every epoch would cost without the cache), in_process
(the cached loader without workers: the CPU work the workers take from training), bare_step (train_step on one
batch already on the device) and loader_step (train_step on the cached loader's batches; loader overhead =
loader_step / bare_step - 1). The last line is one JSON object.

    python bench/loader_speed.py --steps 4 [--config NAME] [--set data.num_workers=2 train.amp=false ...]
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from common import median_seconds, parser, timed
from pylon.config import load_config
from pylon.data.cache import ImageCache, resize_image
from pylon.data.pipeline import PreparedData, split_loader
from pylon.data.readers import read_image
from pylon.device import choose_precision, resolve_device
from pylon.distributed import Dist
from pylon.engine import setup, start_epoch, train_step

TARGET_OVERHEAD_PCT = 10.0
DEFAULTS = ["model.backbone=resnet50", "data.image_size=256", "train.batch_size=8"]


class FileImages(ImageCache):
    """A built cache whose rows are decoded from their original files at every read, as without a cache."""

    def __init__(self, cache: ImageCache, resize: str):
        super().__init__(cache.path, cache.records, cache.geometry, cache.image_size, cache.unreadable)
        self.resize = resize

    def image(self, i: int) -> np.ndarray:
        return resize_image(read_image(self.records[i].path), self.image_size, self.resize)[0]


def loaders(cfg: Any, data: PreparedData, n_items: int) -> dict[str, DataLoader]:
    """The training loader over the cache and over each source's files, and the cached one without workers;
    each epoch holds ``n_items`` (the training rows repeated), drawn uniformly."""
    plain = OmegaConf.merge(cfg.data, {"source_shares": {}, "balanced_sampler": False})
    rows = data.rows["train"]
    sources = np.array([data.cache.records[r].source for r in rows])
    kinds = {"cached": (data.cache, rows, plain), "in_process": (data.cache, rows, OmegaConf.merge(plain, {"num_workers": 0}))}
    for source in sorted(set(sources)):
        kinds[f"decode_{source}"] = (FileImages(data.cache, cfg.data.resize), rows[sources == source], plain)
    return {name: split_loader(PreparedData(cache, {"train": np.resize(r, n_items)}, data.mean, data.std), "train",
                               data_cfg, cfg.train.batch_size, train=True, seed=cfg.train.seed)
            for name, (cache, r, data_cfg) in kinds.items()}


def epoch_of(loader: DataLoader, cfg: Any, epoch: int, started: list[float]) -> Iterator[dict]:
    """A fresh epoch of ``loader``; the wait for its first batch (worker start-up) goes to ``started``."""
    start_epoch(loader, cfg.train, epoch)
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    started.append(time.perf_counter() - start)
    yield first
    yield from batches


def main() -> None:
    ap = parser(__doc__, rounds=3)
    ap.add_argument("--config", default="demo.yaml", help="a config name or file (default demo.yaml)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], help="config values, after: " + " ".join(DEFAULTS))
    ap.add_argument("--steps", type=int, default=4, help="timed batches (or steps) per job and round (default 4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*DEFAULTS, *args.overrides])
    d = Dist(device=resolve_device(cfg.train.device))
    start = time.perf_counter()
    model, data, optimizer, scaler, loss_fn = setup(cfg, d)  # train.py's: seeding, model, data, cache build
    setup_s = time.perf_counter() - start
    batch, workers = cfg.train.batch_size, cfg.data.num_workers
    feeds = loaders(cfg, data, (2 * workers + args.steps + 2) * batch)  # enough for one round's draining and steps
    started: list[float] = []
    bare = {k: v.to(d.device) for k, v in next(iter(feeds["in_process"])).items() if k in ("image", "label")}
    step = lambda b: train_step(model, b, optimizer, loss_fn, scaler, d, cfg.train)  # noqa: E731
    epochs = itertools.count()

    def through(name: str, train: bool) -> float:
        """Seconds for --steps batches (or loader-fed steps) of a fresh epoch, after its prefetched batches."""
        batches = epoch_of(feeds[name], cfg, next(epochs), started)
        consume = (lambda: step(next(batches))) if train else (lambda: next(batches))
        for _ in range(1 if train else 2 * workers):  # start-up, and the batches queued meanwhile: not timed
            consume()
        return timed(lambda: [consume() for _ in range(args.steps)], d.device)()

    jobs = {name: (lambda n=name: through(n, False)) for name in feeds}
    jobs["loader_step"] = lambda: through("cached", True)
    jobs["bare_step"] = timed(lambda: [step(bare) for _ in range(args.steps)], d.device)
    model.train()
    print(f"device {d.device} ({choose_precision(d.device, cfg.train).name}), {args.threads} threads, {workers} "
          f"workers, batch {batch}, {cfg.data.image_size} px, {cfg.model.arch} {cfg.model.backbone}", flush=True)
    per_batch = {name: s / args.steps for name, s in median_seconds(jobs, args.rounds, args.warmup).items()}
    report(per_batch, batch, setup_s, float(np.median(started)))


def report(per_batch: dict[str, float], batch: int, setup_s: float, start_s: float) -> None:
    rate = {name: batch / s for name, s in per_batch.items()}
    overhead = (per_batch["loader_step"] / per_batch["bare_step"] - 1) * 100
    result = {"img_per_s": {k: round(v, 2) for k, v in rate.items()}, "setup_s": round(setup_s, 1),
              "epoch_start_s": round(start_s, 3), "loader_overhead_pct": round(overhead, 2),
              "loader_work_pct_of_step": round(per_batch["in_process"] / per_batch["bare_step"] * 100, 2),
              "cached_over_train": round(rate["cached"] / rate["bare_step"], 1),
              "cores_for_2500_img_per_s": round(2500 / rate["in_process"], 2),
              **{f"cached_over_{k}": round(rate["cached"] / v, 2) for k, v in rate.items() if k.startswith("decode_")}}
    print(f"setup (index, cache, model) {setup_s:.1f} s; a fresh epoch's first batch after {start_s:.2f} s")
    print("img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))
    for key in [k for k in result if k.startswith("cached_over_")]:
        print(f"  {key.replace('_over_', ' / ')}: {result[key]}x")
    print(f"loader overhead {overhead:+.1f}% of a step (target < {TARGET_OVERHEAD_PCT:.0f}%); the loader's own work "
          f"is {result['loader_work_pct_of_step']:.2f}% of a step; {result['cores_for_2500_img_per_s']} cores "
          "load 2,500 img/s")
    print(json.dumps({**result, "within_target": overhead < TARGET_OVERHEAD_PCT}))


if __name__ == "__main__":
    main()

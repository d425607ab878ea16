"""Training-loader speed: the memory-mapped cache vs decoding original files vs the model.

Three loaders feed the same training augmentation through a DataLoader with --workers:
  cached         rows of the uint8 cache (pylon.data.cache + CxrDataset)
  decode_kaggle  read_image + resize of the Kaggle files, then the same augmentation
  decode_kaggle_fullsize  the same for generated 1300x1700 JPEGs (the real samples are
                 224x224 re-saves, far cheaper to decode than the originals)
  decode_rsna    the same for the RSNA DICOMs (1024x1024, JPEG-compressed)
and a PYLON-R50 training step (bench/model_speed.py's step, CPU, --threads) gives the rate
the loader has to keep up with. Rounds interleave all four so load drifts hit them alike.
Per-core rates (one process, no DataLoader) and a breakdown of where an item's time goes
are measured too.

    python bench/loader_speed.py --workers 2 --image-size 256

Data: --kaggle-root / --rsna-root, else the real samples in ../shared/realdata when present
(override with PYLON_REALDATA), else generated files. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pylon.config import AugmentConfig, DataConfig  # noqa: E402
from pylon.data.cache import ImageCache, build_cache, resize_image  # noqa: E402
from pylon.data.dataset import CxrDataset, collate, reseed, seed_worker  # noqa: E402
from pylon.data.dataset import train_transform as _train_transform  # noqa: E402
from pylon.data.readers import read_image  # noqa: E402
from pylon.data.records import Box, Record  # noqa: E402


def train_transform(image_size: int):
    """The default training augmentation with the reference normalisation."""
    return _train_transform(image_size, AugmentConfig(), mean=DataConfig.mean, std=DataConfig.std)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kaggle-root", type=Path, help="folder holding chest_xray/{train,test}/...")
    parser.add_argument("--rsna-root", type=Path, help="folder holding stage_2_train_labels.csv and images")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize", default="stretch", choices=("stretch", "letterbox"))
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (and cache-build processes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-kaggle", type=int, default=1024, help="Kaggle images to use (random subset)")
    parser.add_argument("--n-fullsize", type=int, default=16,
                        help="generated 1300x1700 JPEGs for a full-size Kaggle decode rate (0: skip)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model step")
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--no-model", action="store_true", help="skip the PYLON-R50 train step")
    parser.add_argument("--cache-dir", type=Path, help="default: a fresh temporary folder (so the build is timed)")
    return parser.parse_args()


# ---------------------------------------------------------------- data


def realdata_root() -> Path:
    override = os.environ.get("PYLON_REALDATA")
    return Path(override) if override else ROOT.parent / "shared" / "realdata"


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    coarse = rng.integers(30, 220, size=(h // 32 + 1, w // 32 + 1)).astype(np.uint8)
    image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.add(image, rng.integers(0, 12, size=(h, w), dtype=np.uint8))


def fullsize_kaggle_files(folder: Path, n: int) -> list[Record]:
    """JPEGs of 1300x1700 pixels, standing in for the full-size Kaggle originals (the real
    samples were re-saved at 224x224, which makes decoding them unrealistically cheap)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = folder / f"kaggle_{i}.jpeg"
        Image.fromarray(_texture(rng, 1300, 1700)).save(path, quality=90)
        records.append(Record(f"k{i}", f"kp{i}", "kaggle", str(path), i % 2))
    return records


def generated_rsna_files(folder: Path, n: int) -> list[Record]:
    """1024x1024 JPEG-baseline DICOMs like the RSNA challenge files."""
    from tools.make_demo import write_dicom

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = folder / f"rsna_{i}.dcm"
        write_dicom(path, _texture(rng, 1024, 1024), {"PatientID": f"rp{i}"})
        boxes = (Box(300.0, 300.0, 200.0, 250.0),) if i % 3 == 0 else ()
        records.append(Record(f"r{i}", f"rp{i}", "rsna", str(path), int(bool(boxes)), boxes))
    return records


def load_records(args: argparse.Namespace, scratch: Path) -> tuple[list[Record], list[Record], str]:
    from pylon.data.sources import kaggle as kaggle_source, rsna as rsna_source

    real = realdata_root()
    kaggle_root = args.kaggle_root or (real / "kermany_224" if (real / "kermany_224").is_dir() else None)
    rsna_root = args.rsna_root or (real / "rsna_sample" if (real / "rsna_sample").is_dir() else None)
    if kaggle_root is None and rsna_root is None:
        kaggle = fullsize_kaggle_files(scratch / "generated", min(args.n_kaggle, 64))
        rsna = generated_rsna_files(scratch / "generated", 16)
        return kaggle, rsna, "generated (1300x1700 JPEG, 1024x1024 JPEG DICOM)"
    kaggle = kaggle_source.index(kaggle_root) if kaggle_root else []
    rsna = rsna_source.index(rsna_root) if rsna_root else []
    if len(kaggle) > args.n_kaggle:
        pick = np.random.default_rng(0).choice(len(kaggle), size=args.n_kaggle, replace=False)
        kaggle = [kaggle[i] for i in sorted(pick)]
    return kaggle, rsna, f"kaggle={kaggle_root} rsna={rsna_root}"


class DecodeDataset(Dataset):
    """What training would cost without a cache: decode + resize every item, every epoch."""

    def __init__(self, records: list[Record], image_size: int, resize: str, transform):
        self.records, self.image_size, self.resize, self.transform = records, image_size, resize, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image, geometry = resize_image(read_image(record.path), self.image_size, self.resize)  # type: ignore[arg-type]
        boxes = geometry.boxes_to_cache(record.scored_boxes).astype(np.float32)
        out = self.transform(image=image, bboxes=boxes)
        return {"image": out["image"], "label": torch.tensor([float(record.label)]),
                "boxes": torch.from_numpy(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
                "row": index, "id": record.id, "source": record.source}


# ---------------------------------------------------------------- timing


def loader_rate(dataset: Dataset, args: argparse.Namespace, seed: int) -> float:
    """Images/s of a fresh DataLoader, timed after its prefetch queue has filled once."""
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=RandomSampler(dataset, replacement=True, num_samples=10**9,
                              generator=torch.Generator().manual_seed(seed)),
        num_workers=args.workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = iter(loader)
    warmup = max(1, args.workers * 2)  # worker start-up plus the default prefetch depth
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    n = sum(next(batches)["image"].shape[0] for _ in range(args.batches))
    elapsed = time.perf_counter() - start
    del batches
    return n / elapsed


def per_core_rates(datasets: dict[str, Dataset], rounds: int = 5, seconds: float = 0.4) -> dict[str, float]:
    """Items/s of one process calling dataset[i] (no DataLoader, one OpenCV/torch thread),
    in short bursts that alternate between the datasets."""
    rng = np.random.default_rng(0)
    counts = {name: 0 for name in datasets}
    spent = {name: 0.0 for name in datasets}
    for _ in range(rounds):
        for name, dataset in datasets.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                dataset[int(rng.integers(len(dataset)))]
                counts[name] += 1
            spent[name] += time.perf_counter() - start
    return {name: counts[name] / spent[name] for name in datasets}


def stage_breakdown(cache: ImageCache, records: list[Record], transform, args, repeats: int = 200) -> dict:
    """Mean microseconds per item for each stage of the cached and the decoding paths."""
    rng = np.random.default_rng(1)
    rows = rng.integers(len(cache), size=repeats)
    stats: dict[str, list[float]] = {k: [] for k in ("cache_read", "augment", "to_item", "collate_per_item")}
    items = []
    dataset = CxrDataset(cache, np.arange(len(cache)), transform)
    for row in rows:
        t0 = time.perf_counter()
        image = cache.image(int(row))
        t1 = time.perf_counter()
        transform(image=image, bboxes=cache.boxes_in_cache_frame(int(row)))
        t2 = time.perf_counter()
        items.append(dataset[int(row)])
        t3 = time.perf_counter()
        stats["cache_read"].append(t1 - t0)
        stats["augment"].append(t2 - t1)
        stats["to_item"].append(t3 - t2)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        t0 = time.perf_counter()
        collate(chunk)
        stats["collate_per_item"].append((time.perf_counter() - t0) / len(chunk))
    decode: dict[str, list[float]] = {}
    for source in ("kaggle", "rsna"):
        subset = [r for r in records if r.source == source][:20]
        for record in subset:
            t0 = time.perf_counter()
            image = read_image(record.path)
            t1 = time.perf_counter()
            resize_image(image, args.image_size, args.resize)
            t2 = time.perf_counter()
            decode.setdefault(f"read_{source}", []).append(t1 - t0)
            decode.setdefault(f"resize_{source}", []).append(t2 - t1)
    stats.update(decode)
    # each augmentation step alone, forced on (p=1), on cached rows without boxes
    import albumentations as A

    images = [cache.image(int(r)) for r in rows[:50]]
    for step in transform.transforms:
        forced = A.Compose([type(step)(**{**step.get_transform_init_args(), "p": 1.0})])
        start = time.perf_counter()
        for image in images:
            forced(image=image if not isinstance(step, A.ToTensorV2) else image.astype(np.float32))
        stats[f"step_{type(step).__name__}"] = [(time.perf_counter() - start) / len(images)]
    one_box = np.array([[40.0, 40.0, 60.0, 80.0]], np.float32)
    for label, boxes in (("augment_no_box", np.zeros((0, 4), np.float32)), ("augment_one_box", one_box)):
        start = time.perf_counter()
        for image in images:
            transform(image=image, bboxes=boxes)
        stats[label] = [(time.perf_counter() - start) / len(images)]
    out = {k: round(statistics.fmean(v) * 1e6, 1) for k, v in stats.items() if v}
    out["note"] = ("to_item = the whole CxrDataset.__getitem__ (read + augment + tensors); "
                   "step_* = one augmentation step forced on (the recipe applies most with p=0.5)")
    return out


def model_step_fn(args: argparse.Namespace) -> Optional[tuple[Callable[[], None], str]]:
    """A PYLON-R50 train step on CPU, using bench/model_speed.py's definition of a step."""
    if args.no_model:
        return None
    from pylon.models import PylonConfig

    try:
        from model_speed import make_steps  # bench/model_speed.py
        source = "bench/model_speed.make_steps"
    except ImportError:
        make_steps = None
        source = "local"
    torch.manual_seed(0)
    model = PylonConfig(n_in=1, n_out=1, backbone="resnet50", weights=None).make_model()
    x = torch.randn(args.model_batch, 1, args.image_size, args.image_size)
    y = torch.randint(0, 2, (args.model_batch, 1)).float()
    if make_steps is not None:
        return make_steps(model, x, y, None)["train"], source
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(model(x).logits, y).backward()
        optimizer.step()

    return step, source


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="loader_speed_"))
    kaggle, rsna, data_note = load_records(args, scratch)
    records = kaggle + rsna
    if not records:
        sys.exit("no images found: pass --kaggle-root/--rsna-root")
    print(f"data: {len(kaggle)} Kaggle + {len(rsna)} RSNA images ({data_note})")
    print(f"image size {args.image_size} ({args.resize}), batch {args.batch_size}, {args.workers} loader workers, "
          f"{os.cpu_count()} CPUs visible, model threads {args.threads}")

    cache_dir = args.cache_dir or scratch / "cache"
    start = time.perf_counter()
    cache = build_cache(records, cache_dir, image_size=args.image_size, resize=args.resize,
                        workers=args.workers, progress=True)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    build_cache(records, cache_dir, image_size=args.image_size, resize=args.resize, workers=args.workers,
                progress=False)
    reuse_s = time.perf_counter() - start
    print(f"cache: {len(cache)} images in {build_s:.1f} s ({len(records) / build_s:.0f} img/s with "
          f"{args.workers} processes); reuse {reuse_s * 1e3:.1f} ms; {cache.path}")

    transform = train_transform(args.image_size)
    reseed(transform, 0)
    loaders: dict[str, Dataset] = {"cached": CxrDataset(cache, np.arange(len(cache)), train_transform(args.image_size))}
    if kaggle:
        loaders["decode_kaggle"] = DecodeDataset(kaggle, args.image_size, args.resize, train_transform(args.image_size))
    if args.n_fullsize > 0:
        fullsize = fullsize_kaggle_files(scratch / "fullsize", args.n_fullsize)
        loaders["decode_kaggle_fullsize"] = DecodeDataset(fullsize, args.image_size, args.resize,
                                                          train_transform(args.image_size))
    if rsna:
        loaders["decode_rsna"] = DecodeDataset(rsna, args.image_size, args.resize, train_transform(args.image_size))

    torch.set_num_threads(1)
    per_core = per_core_rates(loaders)
    breakdown = stage_breakdown(cache, records, transform, args)
    torch.set_num_threads(args.threads)
    print("per core (1 process, no DataLoader): " + ", ".join(f"{k} {v:.0f} img/s" for k, v in per_core.items()))
    print("mean us per item: " + ", ".join(f"{k} {v}" for k, v in breakdown.items() if k != "note"))

    step = model_step_fn(args)
    if step is not None:
        step[0]()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    model_s: list[float] = []
    for round_ in range(args.rounds):
        for name, dataset in loaders.items():
            rates[name].append(loader_rate(dataset, args, seed=round_))
        if step is not None:
            t0 = time.perf_counter()
            step[0]()
            model_s.append(time.perf_counter() - t0)
        line = ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items())
        extra = f", PYLON-R50 train {args.model_batch / model_s[-1]:.2f}" if model_s else ""
        print(f"round {round_ + 1}/{args.rounds} img/s: {line}{extra}")

    median = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "data": data_note, "n_kaggle": len(kaggle), "n_rsna": len(rsna), "image_size": args.image_size,
        "resize": args.resize, "batch_size": args.batch_size, "workers": args.workers,
        "cpus_visible": os.cpu_count(), "cache_build_s": round(build_s, 2),
        "cache_build_img_per_s": round(len(records) / build_s, 1), "cache_reuse_ms": round(reuse_s * 1e3, 1),
        "loader_img_per_s": {k: round(v, 1) for k, v in median.items()},
        "per_core_img_per_s": {k: round(v, 1) for k, v in per_core.items()},
        "stage_us": breakdown,
    }
    print(f"\nmedian of {args.rounds} rounds, images/s through a DataLoader with {args.workers} workers:")
    for name, value in median.items():
        print(f"  {name:14s} {value:8.0f}   (per core {per_core[name]:.0f})")
    for name in ("decode_kaggle", "decode_kaggle_fullsize", "decode_rsna"):
        if name in median:
            result[f"ratio_cached_over_{name}"] = round(median["cached"] / median[name], 2)
            print(f"  cached / {name}: {result[f'ratio_cached_over_{name}']:.1f}x")
    if model_s:
        train_rate = args.model_batch / statistics.median(model_s)
        result["pylon_r50_train_img_per_s"] = round(train_rate, 2)
        result["pylon_r50_threads"] = args.threads
        result["model_step_source"] = step[1]
        result["ratio_cached_over_pylon_train"] = round(median["cached"] / train_rate, 1)
        print(f"  PYLON-R50 train ({args.threads} threads, batch {args.model_batch}): {train_rate:.2f} img/s; "
              f"cached loader / model = {result['ratio_cached_over_pylon_train']:.0f}x")
    cores_for_2500 = 2500 / per_core["cached"]
    result["cores_for_2500_img_per_s"] = round(cores_for_2500, 1)
    print(f"  cores needed for 2,500 img/s at the cached per-core rate: {cores_for_2500:.1f}")
    if args.cache_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)  # the temporary cache (and any generated files)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

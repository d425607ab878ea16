"""Heatmap throughput: PYLON's forward pass vs Grad-CAM on the ResNet-50 baseline.

All maps come from ``pylon.heatmaps.heatmaps`` (what evaluation runs), on the same batch
(--batch x 1 x --size x --size, random weights) and the same CPU threads:

  pylon      PYLON-R50: one forward pass, sigmoid of the decoder's map (64x64 at 256 px)
  gradcam    ResNet-50 baseline + pytorch-grad-cam GradCAM: forward + full backward
             (native map 8x8 at 256 px; the library upsamples it to the input size)
  cam        the same baseline's CAM: one forward pass. Any Grad-CAM needs at least this,
             so it bounds from below what a Grad-CAM that stopped its backward pass at the
             target layer could cost.
  gradcam++  (with --plusplus) pytorch-grad-cam GradCAMPlusPlus

Also timed: scoring --score-maps PYLON-sized maps (64x64 at 256 px, one to three boxes each)
with ``pylon.metrics.point_accuracy``, the localization metric of evaluate.py (target: 6,000
maps in under 10 s on a CPU).

After --warmup rounds, each of --repeats rounds times every method once, in an order that
rotates from round to round so drifting machine load hits all alike. The headline
figures are medians; the fastest round of each method is shown too (on a machine shared
with other work the minimum is the steadier estimate of the undisturbed cost). Prints
maps/s per method and PYLON's throughput over Grad-CAM's; the last line is one JSON object.

    python bench/heatmap_speed.py --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pylon.heatmaps import heatmaps  # noqa: E402
from pylon.metrics import point_accuracy  # noqa: E402
from pylon.models import BaselineConfig, PylonConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--size", type=int, default=256, help="input height = width (default 256)")
    parser.add_argument("--plusplus", action="store_true", help="also time Grad-CAM++")
    parser.add_argument("--score-maps", type=int, default=6000, help="maps scored by point_accuracy (default 6000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--threads, --repeats and --batch must be >= 1, --warmup >= 0")
    if args.size % 32 or args.size < 64:
        parser.error("--size must be a multiple of 32, at least 64")
    return args


def time_point_accuracy(n: int, size: int, seed: int) -> float:
    """Seconds to score ``n`` random maps at 1/4 of ``size`` against 1-3 random boxes each."""
    rng = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size // 4, size // 4, generator=rng)
    corners = torch.randint(0, size // 2, (n, 3, 2), generator=rng).tolist()
    counts = torch.randint(1, 4, (n,), generator=rng).tolist()
    boxes = [[(x, y, size / 4, size / 4) for x, y in corners[i][:counts[i]]] for i in range(n)]
    start = time.perf_counter()
    point_accuracy(maps, boxes, image_size=(size, size))
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pylon = PylonConfig(n_in=1, n_out=1, backbone="resnet50", weights=None).make_model().eval()
    baseline = BaselineConfig(n_in=1, n_out=1, backbone="resnet50", weights=None).make_model().eval()
    x = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))

    jobs = {"pylon": (pylon, "pylon"), "gradcam": (baseline, "gradcam"), "cam": (baseline, "cam")}
    if args.plusplus:
        jobs["gradcam++"] = (baseline, "gradcam++")
    names = list(jobs)

    with torch.no_grad():
        native = {
            "pylon": tuple(pylon(x[:1]).heatmap.shape[-2:]),
            "gradcam": tuple(baseline(x[:1]).heatmap.shape[-2:]),  # target layer = CAM grid
        }
    returned = {}
    times = {name: [] for name in names}
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            model, method = jobs[name]
            start = time.perf_counter()
            maps = heatmaps(model, x, method)
            elapsed = time.perf_counter() - start
            returned[name] = tuple(maps.shape[-2:])
            if round_ >= args.warmup:
                times[name].append(elapsed)

    median = {name: statistics.median(times[name]) for name in names}
    maps_per_s = {name: args.batch / median[name] for name in names}
    ratio = maps_per_s["pylon"] / maps_per_s["gradcam"]
    fastest = {name: min(times[name]) for name in names}
    ratio_fastest = fastest["gradcam"] / fastest["pylon"]

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"batch {args.batch}x1x{args.size}x{args.size}, weights None, "
          f"{args.warmup} warm-up + {args.repeats} interleaved rounds, medians")
    for name in names:
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:10s} {median[name]:7.3f} s/batch ({spread})  {maps_per_s[name]:7.2f} maps/s  "
              f"returned {returned[name][0]}x{returned[name][1]}")
    (ph, pw), (gh, gw) = native["pylon"], native["gradcam"]
    print(f"native map: PYLON {ph}x{pw} = {ph * pw} px, Grad-CAM {gh}x{gw} = {gh * gw} px "
          f"({ph * pw / (gh * gw):.0f}x more)")
    print(f"PYLON / Grad-CAM throughput: {ratio:.2f}x on medians, {ratio_fastest:.2f}x on fastest rounds "
          f"(target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    print(f"PYLON / CAM (one baseline forward) throughput: {maps_per_s['pylon'] / maps_per_s['cam']:.2f}x")
    score_s = time_point_accuracy(args.score_maps, args.size, args.seed)
    print(f"point_accuracy: {args.score_maps} maps of {args.size // 4}x{args.size // 4} scored in {score_s:.2f} s "
          f"(target for 6,000: < 10 s)")
    print(json.dumps({
        "bench": "heatmap_speed",
        "threads": args.threads,
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "seconds_per_batch": {k: round(v, 4) for k, v in median.items()},
        "maps_per_s": {k: round(v, 3) for k, v in maps_per_s.items()},
        "fastest_seconds_per_batch": {k: round(v, 4) for k, v in fastest.items()},
        "pylon_over_gradcam": round(ratio, 3),
        "pylon_over_gradcam_fastest": round(ratio_fastest, 3),
        "pylon_over_cam": round(maps_per_s["pylon"] / maps_per_s["cam"], 3),
        "native_pixels": {"pylon": ph * pw, "gradcam": gh * gw},
        "target_met": ratio >= 2.0,
        "point_accuracy_maps": args.score_maps,
        "point_accuracy_seconds": round(score_s, 3),
    }))


if __name__ == "__main__":
    main()

"""Heatmap throughput: PYLON's forward pass vs Grad-CAM on the ResNet-50 baseline.

Every map comes from ``pylon.heatmaps.heatmaps`` (what evaluation runs) on one batch, from pylon_r50.yaml's
models with random weights: PYLON-R50 (one forward pass, a 64x64 map at 256 px), the ResNet-50 baseline's
Grad-CAM (forward + full backward; an 8x8 map upsampled to the input), its CAM (one forward pass: the least
any Grad-CAM costs) and, with --plusplus, Grad-CAM++. Also timed: scoring --score-maps maps with
``pylon.metrics.point_accuracy``, evaluate.py's localization metric (target: 6,000 in under 10 s).
The last line is one JSON object.

    python bench/heatmap_speed.py --threads 2 --rounds 5
"""
from __future__ import annotations

import json

import torch

from common import median_seconds, model_config, parser, timed
from pylon.heatmaps import heatmaps
from pylon.metrics import point_accuracy
from pylon.models import build_model


def time_point_accuracy(n: int, size: int, seed: int) -> float:
    """Seconds to score ``n`` random maps at 1/4 of ``size`` against 1-3 random boxes each."""
    rng = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size // 4, size // 4, generator=rng)
    corners = torch.randint(0, size // 2, (n, 3, 2), generator=rng).tolist()
    counts = torch.randint(1, 4, (n,), generator=rng).tolist()
    boxes = [[(x, y, size / 4, size / 4) for x, y in corners[i][:counts[i]]] for i in range(n)]
    return timed(lambda: point_accuracy(maps, boxes, image_size=(size, size)), maps.device)()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    ap.add_argument("--size", type=int, default=256, help="input height = width, a multiple of 32 (default 256)")
    ap.add_argument("--plusplus", action="store_true", help="also time Grad-CAM++")
    ap.add_argument("--score-maps", type=int, default=6000, help="maps scored by point_accuracy (default 6000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pylon = build_model(model_config("cpu").model).eval()
    baseline = build_model(model_config("cpu", "model.arch=baseline").model).eval()
    x = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    methods = {"pylon": pylon, "gradcam": baseline, "cam": baseline, **({"gradcam++": baseline} if args.plusplus else {})}
    jobs = {method: timed(lambda m=model, k=method: heatmaps(m, x, k), x.device) for method, model in methods.items()}
    with torch.no_grad():  # the maps each model computes itself; Grad-CAM's come from the CAM grid
        pixels = {name: model(x[:1]).heatmap[0, 0].numel() for name, model in (("pylon", pylon), ("gradcam", baseline))}
    seconds = median_seconds(jobs, args.rounds, args.warmup)
    maps_per_s = {method: args.batch / s for method, s in seconds.items()}
    ratio = maps_per_s["pylon"] / maps_per_s["gradcam"]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}x1x{args.size}x{args.size}, "
          f"random weights, median of {args.rounds} interleaved rounds")
    for method, s in seconds.items():
        print(f"  {method:10s} {s:7.3f} s/batch  {maps_per_s[method]:7.2f} maps/s")
    print(f"native map: PYLON {pixels['pylon']} px, Grad-CAM {pixels['gradcam']} px "
          f"({pixels['pylon'] / pixels['gradcam']:.0f}x more)")
    print(f"PYLON / Grad-CAM throughput: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'}); "
          f"PYLON / CAM: {maps_per_s['pylon'] / maps_per_s['cam']:.2f}x")
    score_s = time_point_accuracy(args.score_maps, args.size, args.seed)
    print(f"point_accuracy: {args.score_maps} maps of {args.size // 4}x{args.size // 4} scored in {score_s:.2f} s "
          "(target for 6,000: < 10 s)")
    print(json.dumps({"bench": "heatmap_speed", "threads": args.threads, "batch": args.batch, "size": args.size,
                      "rounds": args.rounds, "seconds_per_batch": {k: round(v, 4) for k, v in seconds.items()},
                      "maps_per_s": {k: round(v, 3) for k, v in maps_per_s.items()},
                      "pylon_over_gradcam": round(ratio, 3), "native_pixels": pixels, "target_met": ratio >= 2.0,
                      "point_accuracy_maps": args.score_maps, "point_accuracy_seconds": round(score_s, 3)}))


if __name__ == "__main__":
    main()

"""Side-by-side heatmaps of trained runs on a few image files, as one PNG grid.

    python docs/heatmap_grid.py IMAGE... --run runs/<pylon run> --run runs/<baseline run> \
        --out docs/kaggle_test_heatmaps.png

One row per image; one column per (run, heatmap method): PYLON's own map and, for baseline
runs, CAM and Grad-CAM. Each cell shows the network input (the run's resize) with the map
overlaid and the map's peak marked; each run's pneumonia probability is under the image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pylon import cli  # noqa: E402

DEFAULT_METHODS = ("pylon", "cam", "gradcam")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="DICOM, JPEG or PNG files")
    parser.add_argument("--run", dest="runs", action="append", required=True, metavar="RUN_DIR",
                        help="a trained run folder; repeat for several models")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"heatmap methods to show where a model supports them (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)

    import torch

    from pylon.config import ConfigError
    from pylon.heatmaps import heatmaps, methods_for
    from pylon.inference import file_input, load_run, probabilities
    from pylon.metrics import argmax_points
    from pylon.plots import OverlayRow, plot_overlay_grid
    from pylon.runs import find_run

    rows = [OverlayRow(image=None, heatmaps={}, points={}, title=path.name) for path in args.images]
    shown_size = None  # every column is drawn on the first run's input; points are scaled to it
    for run_dir in args.runs:
        trained = load_run(find_run(run_dir, "runs"), device="cpu")
        size = int(trained.cfg.data.image_size)
        shown_size = shown_size or size
        prepared = [file_input(path, trained) for path in args.images]
        batch = torch.stack([tensor for *_, tensor in prepared])
        probs = probabilities(trained.model, batch, trained.precision)
        label = "PYLON" if trained.cfg.model.arch == "pylon" else trained.cfg.model.backbone.replace("resnet", "ResNet")
        for row, (_, resized, _, _), prob in zip(rows, prepared, probs):
            row.image = resized if row.image is None else row.image
            row.title += f"\n{label}: p={prob:.2f}"
        methods = [m for m in args.methods if m in methods_for(trained.model)]
        if not methods:
            raise ConfigError(f"--run {run_dir}: none of --methods {' '.join(args.methods)} applies to this "
                              f"{trained.cfg.model.arch} model; it has {' '.join(methods_for(trained.model))}")
        for method in methods:
            maps = heatmaps(trained.model, batch, method, trained.prior, trained.precision)
            points = argmax_points(maps, (size, size)) * (shown_size / size)
            column = label if method == "pylon" else f"{label} {method}"
            for row, heat, point in zip(rows, maps, points):
                row.heatmaps[column] = heat
                row.points[column] = point
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_overlay_grid(rows, args.out, title=args.title)
    print(args.out)
    return 0


if __name__ == "__main__":
    cli.run(main)

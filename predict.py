"""Apply a trained run to image files: python predict.py IMAGE... [--run runs/<name>] [--out DIR]

DICOM, JPEG and PNG. For each image: the pneumonia probability, the heatmap's peak in the
original image's pixels and an overlay PNG; a CSV of the results in --out (default
<run>/predict/). Unreadable files are reported and skipped; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from pylon import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="DICOM, JPEG or PNG files")
    cli.add_run_args(parser)
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/predict)")
    parser.add_argument("--method", help="heatmap method (default: the model's own: pylon, or cam for baselines)")
    parser.add_argument("--boxes-csv", type=Path, metavar="CSV",
                        help="RSNA stage_2_train_labels.csv-style boxes to draw when an image's patientId (file name) is in it")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's train.device)")
    args = parser.parse_args(argv)

    from pylon.config import DEVICE_PATTERN, ConfigError
    from pylon.runs import check_writable, find_run

    run = find_run(args.run, args.runs_dir)  # before the heavy imports: a wrong --run fails at once
    if args.device is not None and not re.fullmatch(DEVICE_PATTERN, args.device):
        raise ConfigError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder for the overlays and predictions.csv")
    out = args.out or run.root / "predict"
    check_writable(out, "--out")  # before the model is loaded
    import pandas as pd

    from pylon.inference import load_run, predict_files

    boxes = None
    if args.boxes_csv:
        from pylon.data.sources.rsna import read_labels

        if not args.boxes_csv.is_file():
            raise FileNotFoundError(f"--boxes-csv {args.boxes_csv}: file not found")
        _, boxes = read_labels(args.boxes_csv)
    trained = load_run(run, device=args.device)
    results = predict_files(trained, args.images, out, method=args.method, boxes_by_id=boxes)
    table = pd.DataFrame(map(asdict, results)).rename(columns={"path": "file"})
    table.fillna({"overlay": "", "error": ""}).to_csv(out / "predictions.csv", index=False)
    print(f"{'file':<40} {'P(pneumonia)':>12}  {'peak (x, y) px':<18} overlay")
    for r in results:
        name = Path(r.path).name if len(Path(r.path).name) <= 40 else "..." + Path(r.path).name[-37:]
        if r.error:
            print(f"{name:<40} {'failed':>12}  {'':<18} (see the error above)")
        else:
            print(f"{name:<40} {r.probability:>12.4f}  {f'({r.peak_x:.0f}, {r.peak_y:.0f})':<18} {r.overlay}")
    print(f"\npredictions: {out / 'predictions.csv'}")
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be read (errors above)")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)

"""Evaluate a trained run: python evaluate.py [--run runs/<name>] [--localization] [--split test|val]

With no --run, the most recent run. Rebuilds the run's data (same split and cache), loads
checkpoints/best.pt and writes <run>/eval/: metrics.json (classification at 0.5 and at the
Youden threshold chosen on val, with bootstrap 95% intervals, per source and per RSNA view;
with --localization, point_acc and pointing_game_15px per heatmap method), predictions.csv
and figures. Change evaluation settings with --set eval.key=value (e.g. eval.methods=[pylon]).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from pylon import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", metavar="RUN_DIR", help="the run folder (default: the most recent run in --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where runs live when --run is not given (default: runs)")
    parser.add_argument("--localization", action="store_true",
                        help="also score heatmaps against the boxes (every method the model supports, or eval.methods)")
    parser.add_argument("--split", choices=("test", "val"), help="the split to evaluate (default: eval.split, test)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override evaluation settings, e.g. --set eval.bootstrap=2000 train.device=cpu")
    args = parser.parse_args(argv)

    from pylon.evaluation import evaluate_run
    from pylon.runs import find_run

    run = find_run(args.run, args.runs_dir)
    overrides = list(args.overrides) + ([f"eval.split={args.split}"] if args.split else [])
    print(f"evaluating {run.root}")
    result = evaluate_run(run, overrides=overrides, localization=args.localization)
    print()
    print(result.text)
    print()
    print("outputs:")
    for path in result.outputs:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)

"""Evaluate a trained run: python evaluate.py [--run runs/<name>] [--localization] [--embeddings] [--split test|val|all]

With no --run, the most recent run. Rebuilds the run's data (same split and cache), loads
checkpoints/best.pt and writes <run>/eval/ (or --out DIR): metrics.json (classification at 0.5
and at val's Youden threshold with bootstrap 95% intervals, per source and per reported view;
with --localization, each heatmap method's localization metrics, listed in the README, beside
the image-blind prior and center baselines), predictions.csv and figures; with --embeddings,
the embedding maps and the shortcut probe (pylon/embeddings.py). Change evaluation settings
with --set eval.key=value (e.g. eval.methods=[pylon]).

Score a trained run on another data set, with the run's stored normalisation, threshold and
box prior (nothing is estimated from the new data):
  python evaluate.py --localization --run RUN --set data.sources=[rsna] data.roots.rsna=/some/rsna \
      eval.split=all --out DIR
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from pylon import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_run_args(parser)
    parser.add_argument("--localization", action="store_true",
                        help="also score heatmaps against the boxes (every method the model supports, or eval.methods)")
    parser.add_argument("--embeddings", action="store_true",
                        help="also map the encoder embeddings (t-SNE, UMAP; by label, source, view) and probe "
                             "them for shortcuts (view, source) beside the model's AUROC within each group")
    parser.add_argument("--split", choices=("test", "val", "all"),
                        help="the split to evaluate (default: eval.split, test); all = every image of the "
                             "configured sources, for scoring the run on another data set")
    parser.add_argument("--out", metavar="DIR",
                        help="where metrics.json and the figures go (default: <run>/eval/)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override evaluation settings, e.g. --set eval.bootstrap=2000 train.device=cpu")
    args = parser.parse_args(argv)

    from pylon.runs import check_writable, find_run

    run = find_run(args.run, args.runs_dir)  # before the heavy imports: a wrong --run fails at once
    check_writable(args.out or run.eval_dir, "--out")  # not after the data was loaded
    from pylon.evaluation import evaluate_run

    overrides = list(args.overrides) + ([f"eval.split={args.split}"] if args.split else [])
    print(f"evaluating {run.root}")
    result = evaluate_run(run, overrides=overrides, localization=args.localization,
                          embeddings=args.embeddings, out=args.out)
    print(f"\n{result.text}\n\noutputs:")
    for path in result.outputs:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)

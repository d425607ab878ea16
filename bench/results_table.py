"""Markdown tables of evaluated runs, side by side: localization per heatmap method and classification.

    python bench/results_table.py RUN [RUN ...] [--eval-dir eval]

Reads each RUN/<eval-dir>/metrics.json and predictions.csv (evaluate.py --localization, or a tools/crossval.py
folder's pooled report). Classification adds, on merged data, the AUROC of the source alone (every image
scored by its source's val prevalence): the part of the merged AUROC that says "which hospital".
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd
from sklearn.metrics import roc_auc_score

from pylon.metrics import LOCALIZATION_METRICS


def fmt(block: Mapping[str, Any], key: str) -> str:
    value = block.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    low, high = (block.get("ci") or {}).get(key, (None, None))
    return f"{value:.3f}" if low is None else f"{value:.3f} [{low:.2f}, {high:.2f}]"


def source_only_auroc(predictions: pd.DataFrame, split: str) -> Optional[float]:
    """AUROC on ``split`` of a score that knows only the image's source (its val prevalence)."""
    val = predictions[predictions.split == "val"]
    evaluated = predictions[predictions.split == split]
    if evaluated.source.nunique() < 2 or val.empty or evaluated.label.nunique() < 2:
        return None
    prevalence = val.groupby("source").label.mean()
    return float(roc_auc_score(evaluated.label, evaluated.source.map(prevalence)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eval-dir", default="eval", help="folder of metrics.json inside each run (default: eval)")
    args = parser.parse_args()

    evaluated = []
    for run in args.runs:
        folder = run / args.eval_dir
        metrics = json.loads((folder / "metrics.json").read_text())
        name = run.name.rsplit("-", 2)[0]  # drop the -YYYYMMDD-HHMMSS stamp
        evaluated.append((name, metrics, pd.read_csv(folder / "predictions.csv")))

    print("Localization on the boxed (positive) images; 95% bootstrap intervals; "
          "n_lat = images whose boxes are all on one side\n")
    print(f"| run | method | view | n | {' | '.join(LOCALIZATION_METRICS)} | n_lat |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, metrics, _ in evaluated:
        for method, entry in metrics.get("localization", {}).items():
            for view, block in [("all", entry), *entry.get("by_view", {}).items()]:
                cells = " | ".join(fmt(block, key) for key in LOCALIZATION_METRICS)
                print(f"| {name} | {method} | {view} | {block['n']} | {cells} | {block.get('n_laterality', '-')} |")
    print("\nClassification (AUROC with 95% intervals; sensitivity / specificity at the val-chosen "
          "Youden threshold)\n")
    print("| run | n | all | kaggle | rsna | rsna AP | rsna PA | source alone | sens | spec |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, metrics, predictions in evaluated:
        c = metrics["classification"]
        groups = [c, c["by_source"].get("kaggle", {}), c["by_source"].get("rsna", {}),
                  c["by_view"].get("AP", {}), c["by_view"].get("PA", {})]
        source_only = source_only_auroc(predictions, metrics["split"])
        at_youden = c.get("threshold_youden", {})  # a cross-validation's pooled report has none
        print(f"| {name} | {c['n']} | " + " | ".join(fmt(g, "auroc") for g in groups)
              + f" | {'-' if source_only is None else f'{source_only:.3f}'}"
              + f" | {fmt(at_youden, 'sensitivity')} | {fmt(at_youden, 'specificity')} |")


if __name__ == "__main__":
    main()

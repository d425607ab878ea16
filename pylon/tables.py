"""The tables evaluate.py prints: classification, localization and the shortcut probe, each
value with its 95% interval where one was computed. metrics.json holds the same numbers."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from pylon.metrics import POINTING_KEY


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _with_interval(value: Any, bounds: Optional[Sequence[Any]]) -> str:
    if not bounds or any(b is None or not math.isfinite(b) for b in bounds):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(bounds[0])}, {_fmt(bounds[1])}]"


def _fmt_ci(entry: Mapping[str, Any], key: str) -> str:
    return _with_interval(entry.get(key), (entry.get("ci") or {}).get(key))


def classification_table(report: Mapping[str, Any], view_names: Optional[Mapping[str, str]] = None) -> str:
    """The classification report as a table; ``view_names`` names ``by_view``'s rows (e.g. AP: rsna/AP)."""
    head = (f"classification on {report['split']} (n={report['n']}): AUROC with 95% CI; acc/sens/spec/F1 at 0.5 | "
            f"at the Youden threshold {_fmt(report['threshold_youden'].get('threshold'))} (chosen on val)")
    header = (f"{'group':<12} {'n':>5}  {'AUROC [95% CI]':<24} {'acc':>6} {'sens':>6} {'spec':>6} {'F1':>6} | "
              f"{'acc':>6} {'sens':>6} {'spec':>6} {'F1':>6}  {'ECE':>6}")
    lines = [head, header, "-" * len(header)]
    groups = [("all", report), *report["by_source"].items(), *[((view_names or {}).get(v, v), b) for v, b in report["by_view"].items()]]
    for name, block in groups:
        at_j = block.get("threshold_youden", {})
        cells = ("accuracy", "sensitivity", "specificity", "f1")
        lines.append(f"{name:<12} {block['n']:>5}  {_fmt_ci(block, 'auroc'):<24} "
                     + " ".join(f"{_fmt(block[k]):>6}" for k in cells) + " | "
                     + " ".join(f"{_fmt(at_j.get(k)):>6}" for k in cells) + f"  {_fmt(block['ece']):>6}")
    return "\n".join(lines)


def localization_table(report: Mapping[str, Any]) -> str:
    header = (f"{'method':<10} {'view':<4} {'n':>4} | {'point_acc':<21} | {'pointing_15px':<21} | "
              f"{'energy_in_box':<21} | {'laterality (n)':<27}")
    lines = [header, "-" * len(header)]
    for method, entry in report.items():
        for view, b in [("all", entry), *entry["by_view"].items()]:
            laterality = f"{_fmt_ci(b, 'laterality_acc')} ({b['n_laterality']})"
            lines.append(f"{method:<10} {view:<4} {b['n']:>4} | {_fmt_ci(b, 'point_acc'):<21} | {_fmt_ci(b, POINTING_KEY):<21} | "
                         f"{_fmt_ci(b, 'energy_in_box'):<21} | {laterality:<27}")
    gaps = [(method, entry["minus_prior"]) for method, entry in report.items() if "minus_prior" in entry]
    if gaps:
        lines += ["", "minus the prior, paired on the same images (95% CI over patients; above 0 = beats the floor)"]
        lines += [f"{method + ' - prior':<18} point_acc {_fmt_ci(g, 'point_acc')}, energy_in_box {_fmt_ci(g, 'energy_in_box')}"
                  for method, g in gaps]
    return "\n".join(lines)


def shortcut_table(report: Mapping[str, Any], split: str, dim: int) -> str:
    lines = [f"shortcut probe on {split} ({dim}-d encoder embeddings; {report['classifier']})",
             f"{'':<44} {'n':>5}  AUROC [95% CI]"]
    sections = (("the features predict", report["features_predict"]),
                ("the model's pneumonia AUROC", report["model_pneumonia_auroc"]),
                ("pneumonia from a shortcut alone (train rates)", report["shortcut_alone_pneumonia_auroc"]))
    for title, entries in sections:
        if entries:
            lines.append(title)
            lines += [f"  {name:<42} {entry['n']:>5}  "
                      + (entry.get("note", "-") if entry["auroc"] is None else _with_interval(entry["auroc"], entry.get("ci")))
                      for name, entry in entries.items()]
    return "\n".join(lines)

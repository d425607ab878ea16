"""Embedding maps and the shortcut probe (``evaluate.py --embeddings``).

An image's embedding is the global average of the encoder's deepest feature map. The maps project
the split's embeddings to 2-D (t-SNE, UMAP) by label, source and view. The probe, a logistic regression
with folds grouped by patient, predicts the view (within each source that reports views) and the source,
beside the model's pneumonia AUROC within each group and what the group alone (its training positive
rate) scores. A probe near 1 with an AUROC that falls within each view says the merged figure leans on
the hospital.
"""
from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pylon import ConfigError, plots
from pylon.data.pipeline import PreparedData
from pylon.data.sources import reported_views
from pylon.inference import SplitPredictions
from pylon.metrics import group_block
from pylon.tables import shortcut_table

PROJECTIONS = {"tsne": "t-SNE", "umap": "UMAP"}  # file name: title
PROBE_FOLDS = 5
NO_VIEW = "no view"  # Kaggle films carry none


def project(features: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """2-D t-SNE and UMAP of the standardised embeddings after PCA to <= 50 dimensions (the usual denoising)."""
    import umap  # numba compiles on import: only when maps are asked for

    n = len(features)
    if n < 4:
        raise ConfigError(f"{n} images are too few to map; evaluate a larger split")
    reduced = PCA(n_components=min(50, n, features.shape[1]), random_state=seed).fit_transform(
        StandardScaler().fit_transform(features))
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
    with warnings.catch_warnings():  # a seeded UMAP runs on one thread and says so
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        umap_map = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed,
                             init="spectral" if n > 16 else "random")  # the spectral start needs a real graph
        return {"tsne": tsne.fit_transform(reduced), "umap": umap_map.fit_transform(reduced)}


def _auroc_entry(block: Mapping[str, Any]) -> dict[str, Any]:
    """An AUROC entry (n, n_positive, auroc, its 95% interval) from a ``group_block``."""
    entry = {"n": block["n"], "n_positive": block["n_pos"], "auroc": block["auroc"]}
    if not math.isfinite(entry["auroc"]):
        entry["auroc"], entry["note"] = None, "one class only"
    elif "ci" in block:
        entry["ci"] = block["ci"]["auroc"]
    return entry


def _auroc(target: np.ndarray, scores: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    return _auroc_entry(group_block(target, scores, None, None, n_boot, seed))


def probe(features: np.ndarray, target: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Out-of-fold AUROC of a logistic regression predicting ``target`` from the embeddings,
    folds grouped by patient (no patient's films on both sides) and stratified."""
    target = target.astype(int)
    # Every training fold needs both classes: at least 2 patients of each, whatever their films.
    smallest = min(len(set(patients[target == 1].tolist())), len(set(patients[target == 0].tolist())))
    if smallest < 2:
        return {"n": int(target.size), "n_positive": int(target.sum()), "auroc": None,
                "note": "fewer than 2 patients of a class: nothing to cross-validate"}
    folds = min(PROBE_FOLDS, smallest)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    scores = cross_val_predict(classifier, features, target, groups=patients, method="predict_proba",
                               cv=StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed))[:, 1]
    return {**_auroc(target, scores, n_boot, seed), "folds": folds}


def _alone(train: list, key: str, y: np.ndarray, groups: pd.Series, n_boot: int, seed: int) -> dict[str, Any]:
    """AUROC of a shortcut that knows only each image's group: the group's positive rate in ``train``."""
    rate = pd.Series([r.label for r in train]).groupby([getattr(r, key) for r in train]).mean()
    return _auroc(y, groups.map(rate).fillna(0.5).to_numpy(), n_boot, seed)


def shortcut_report(features: np.ndarray, frame: pd.DataFrame, classification: Mapping[str, Any],
                    data: PreparedData, n_boot: int, seed: int) -> dict:
    """``embeddings.shortcut_probe``: what the features predict besides pneumonia, the model's pneumonia
    AUROC per group (from the same split's ``classification``), and what view or source alone scores."""
    y, patients = frame["label"].to_numpy(), frame["patient_id"].to_numpy()

    def ask(keep: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        return probe(features[keep], target[keep], patients[keep], n_boot, seed)

    reported = reported_views()  # RSNA: AP and PA
    sources, source, view = sorted(set(frame["source"])), frame["source"], frame["view"]
    viewed = {s: (source == s).to_numpy() & view.isin(views).to_numpy() for s, views in reported.items()}
    probes = {f"view_{a}_vs_{b}_in_{s}": ask(viewed[s] & view.isin([a, b]).to_numpy(), (view == a).to_numpy())
              for s, views in reported.items() for a, b in itertools.combinations(views, 2)}
    probes.update({f"source_{b}_vs_{a}": ask(source.isin([a, b]).to_numpy(), (source == b).to_numpy())
                   for a, b in itertools.combinations(sources, 2)})
    groups = {"all": np.ones(len(frame), dtype=bool), **{s: (source == s).to_numpy() for s in sources},
              **{f"{s}/{v}": viewed[s] & (view == v).to_numpy() for s, views in reported.items() for v in views}}
    groups = {name: keep for name, keep in groups.items() if keep.any()}
    # What the features know of pneumonia itself, in the same groups as the model's AUROC.
    probes.update({f"pneumonia_in_{name}": ask(keep, y) for name, keep in groups.items()})
    blocks = {"all": classification, **classification["by_source"],
              **{f"{s}/{v}": classification["by_view"].get(v) for s, views in reported.items() for v in views}}

    alone: dict[str, Any] = {}
    if len(data.rows.get("train", [])):
        train = data.records("train")
        if len(sources) > 1:
            alone["source_only"] = _alone(train, "source", y, source, n_boot, seed)
        for s, keep in viewed.items():
            if keep.any():
                alone[f"view_only_in_{s}"] = _alone([r for r in train if r.source == s], "view", y[keep], view[keep],
                                                    n_boot, seed)
    classifier = f"standardised features, L2 logistic regression, up to {PROBE_FOLDS}-fold CV grouped by patient"
    return {"features_predict": probes, "model_pneumonia_auroc": {name: _auroc_entry(blocks[name]) for name in groups},
            "shortcut_alone_pneumonia_auroc": alone, "classifier": classifier}


def embedding_maps(data: PreparedData, evaluated: SplitPredictions, classification: Mapping[str, Any], out: Path,
                   n_boot: int, seed: int) -> tuple[dict, list[Path], str]:
    """What ``--embeddings`` adds: (metrics.json section, figures, printed table), and embeddings.csv."""
    features, frame, split = evaluated.embeddings, evaluated.frame(data), evaluated.split
    points = project(features, seed)
    colourings = {"label": frame["label"].map({0: "negative", 1: "pneumonia"}), "source": frame["source"],
                  "view": frame["view"].fillna(NO_VIEW)}
    figures = [plots.plot_embedding(points[name], colourings, out / f"embeddings_{name}.png",
                                    title=f"{title} of the encoder embeddings ({split}, n={len(frame)})")
               for name, title in PROJECTIONS.items()]
    for name in PROJECTIONS:
        frame[f"{name}_x"], frame[f"{name}_y"] = points[name][:, 0], points[name][:, 1]
    frame.to_csv(out / "embeddings.csv", index=False)
    report = shortcut_report(features, frame, classification, data, n_boot, seed)
    section = {"split": split, "n": len(frame), "dim": int(features.shape[1]), "projections": list(PROJECTIONS),
               "shortcut_probe": report}
    return section, figures, shortcut_table(report, split, features.shape[1])

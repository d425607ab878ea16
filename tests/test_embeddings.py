"""evaluate.py --embeddings: the maps and the shortcut probe on the tiny run, and the probe's
cross-validation on features whose answers are known."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import load_script
from pylon.embeddings import probe
from test_evaluate import copy_run

evaluate = load_script("evaluate")


@pytest.fixture(scope="module")
def embedded(tiny_run, tmp_path_factory):
    """The tiny PYLON run evaluated with --embeddings: (run, metrics.json, printed output)."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("embeddings"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert evaluate.main(["--run", str(run), "--embeddings", "--set", "eval.bootstrap=50"]) == 0
    return run, json.loads((run / "eval" / "metrics.json").read_text()), printed.getvalue()


def test_maps_table_and_metrics_cover_the_evaluated_split(embedded):
    run, metrics, _ = embedded
    out = run / "eval"
    for name in ("embeddings_tsne.png", "embeddings_umap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "embeddings.csv")
    predictions = pd.read_csv(out / "predictions.csv")
    test = predictions[predictions.split == "test"]
    assert sorted(table["id"]) == sorted(test["id"])  # the evaluated split, every image once
    assert {"patient_id", "source", "view", "label", "prob", "tsne_x", "tsne_y", "umap_x", "umap_y"} <= set(table)
    assert np.isfinite(table[["tsne_x", "tsne_y", "umap_x", "umap_y"]].to_numpy()).all()
    merged = table.merge(test, on="id", suffixes=("", "_pred"))
    assert (merged["label"] == merged["label_pred"]).all() and np.allclose(merged["prob"], merged["prob_pred"])
    assert table.loc[table.source == "kaggle", "view"].isna().all()
    assert set(table.loc[table.source == "rsna", "view"]) <= {"AP", "PA"}

    section = metrics["embeddings"]
    assert section["split"] == "test" and section["n"] == len(table) and section["dim"] == 256  # ResNet-18 to its third stage (demo.yaml: encoder_depth 4)
    probes = section["shortcut_probe"]
    groups = {"all", "kaggle", "rsna", "rsna/AP", "rsna/PA"}
    assert set(probes["features_predict"]) == {"view_AP_vs_PA_in_rsna", "source_rsna_vs_kaggle",
                                               *(f"pneumonia_in_{g}" for g in groups)}
    assert set(probes["model_pneumonia_auroc"]) == groups
    own = probes["model_pneumonia_auroc"]
    assert own["all"]["auroc"] == pytest.approx(metrics["classification"]["auroc"])
    assert own["kaggle"]["n"] + own["rsna"]["n"] == len(table)
    assert own["rsna"]["auroc"] == pytest.approx(metrics["classification"]["by_source"]["rsna"]["auroc"])


def test_shortcut_alone_scores_are_the_training_split_rates(embedded):
    run, metrics, _ = embedded
    splits = pd.read_csv(run / "splits.csv")
    train_rate = splits[splits.split == "train"].groupby("source")["label"].mean()
    table = pd.read_csv(run / "eval" / "embeddings.csv")
    expected = roc_auc_score(table["label"], table["source"].map(train_rate))
    alone = metrics["embeddings"]["shortcut_probe"]["shortcut_alone_pneumonia_auroc"]
    assert alone["source_only"]["auroc"] == pytest.approx(expected)
    assert "view_only_in_rsna" in alone


def test_the_printed_table_and_outputs(embedded):
    out = embedded[2]
    assert "shortcut probe on test (256-d encoder embeddings" in out
    for line in ("the features predict", "view_AP_vs_PA_in_rsna", "the model's pneumonia AUROC",
                 "pneumonia from a shortcut alone (train rates)", "embeddings_umap.png", "embeddings.csv"):
        assert line in out


def test_a_split_too_small_to_map_is_one_line(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    with pytest.raises(SystemExit):
        evaluate.cli.run(evaluate.main, ["--run", str(run), "--embeddings", "--split", "val", "--set", "eval.bootstrap=0"])
    assert "images are too few to map; evaluate a larger split" in capsys.readouterr().err


def test_without_the_flag_nothing_is_embedded(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    assert evaluate.main(["--run", str(run), "--set", "eval.bootstrap=0"]) == 0
    assert "embeddings" not in json.loads((run / "eval" / "metrics.json").read_text())
    assert not list((run / "eval").glob("embeddings*"))


def test_probe_reads_a_signal_and_its_folds_keep_patients_apart():
    rng = np.random.default_rng(0)
    n_patients, films = 40, 4
    patients = np.repeat(np.arange(n_patients), films).astype(str)
    # Each patient's films share an identity vector; the target is a per-patient coin flip.
    identity = np.repeat(rng.normal(size=(n_patients, 64)), films, axis=0)
    features = identity + 0.01 * rng.normal(size=identity.shape)
    coin = np.repeat(rng.integers(0, 2, n_patients), films)
    grouped = probe(features, coin, patients, n_boot=0, seed=0)
    assert grouped["folds"] == 5 and abs(grouped["auroc"] - 0.5) < 0.2  # nothing to learn across patients
    # Folds that split a patient's films would let the probe recognise the patient.
    by_film = probe(features, coin, np.arange(len(coin)).astype(str), n_boot=0, seed=0)
    assert by_film["auroc"] > 0.95

    signal = rng.integers(0, 2, len(coin))
    marked = np.column_stack([features, signal + 0.3 * rng.normal(size=len(coin))])
    found = probe(marked, signal, patients, n_boot=100, seed=0)
    assert found["auroc"] > 0.9 and found["ci"][0] <= found["auroc"] <= found["ci"][1]
    one_class = probe(features, np.zeros(len(coin)), patients, n_boot=0, seed=0)
    assert one_class["auroc"] is None and "nothing to cross-validate" in one_class["note"]
    # Three positive films of one child among many negatives: no fold could train on positives.
    one_patient = probe(features[:40], np.r_[np.ones(3), np.zeros(37)], np.r_[["a"] * 3, patients[3:40]],
                        n_boot=0, seed=0)
    assert one_patient["auroc"] is None and "fewer than 2 patients of a class" in one_patient["note"]


@pytest.mark.parametrize("arch", ["pylon", "baseline"])
def test_embeddings_come_from_the_prediction_pass(arch):
    import torch

    from pylon.device import Precision
    from pylon.inference import predict_loader
    from pylon.models import BaselineConfig, PylonConfig

    conf = PylonConfig if arch == "pylon" else BaselineConfig
    model = conf(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model().eval()
    images = torch.randn(5, 1, 64, 64)
    batches = [{"image": images[:3], "label": torch.zeros(3, 1), "row": np.arange(3)},
               {"image": images[3:], "label": torch.ones(2, 1), "row": np.arange(3, 5)}]
    out = predict_loader(model, batches, Precision(torch.device("cpu")), embeddings=True, progress=False)
    with torch.no_grad():
        expected = model.encoder(images)[-1].mean(dim=(-2, -1)).numpy()
    assert out["embeddings"].shape == (5, 512)
    np.testing.assert_allclose(out["embeddings"], expected, rtol=1e-4, atol=1e-5)
    assert not model.encoder._forward_hooks  # the capture ends with the pass
    assert "embeddings" not in predict_loader(model, batches, Precision(torch.device("cpu")), progress=False)

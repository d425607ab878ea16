"""evaluate.py on tiny real runs: the session's ``tiny_run`` (PYLON-R18, 64 px, offline W&B)
and a baseline ResNet-18 twin trained here on the same ``tiny_data``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import load_script, quiet_wandb_env, read_wandb_records, run_folders, tiny_overrides
from pylon.config import ConfigError, load_config
from pylon.data.pipeline import prepare_data
from pylon.checkpoint import load_checkpoint
from pylon.heatmaps import box_prior
from pylon.metrics import argmax_points, classification_metrics, pointing_game, youden_threshold

evaluate = load_script("evaluate")

CONTRACT_KEYS = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "n")
CI_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "precision", "f1")
CLASSIFICATION_FIGURES = ("roc.png", "pr.png", "confusion.png", "calibration.png", "learning_curves.png",
                          "failures_misclassified.png")
LOCALIZATION_FIGURES = ("overlays.png", "failures_localization.png")


def run_evaluate(run: Path, *args: str) -> dict:
    assert evaluate.main(["--run", str(run), *args]) == 0
    return json.loads((run / "eval" / "metrics.json").read_text())


def copy_run(run: Path, dest: Path, wandb_mode: str = "disabled", **config_changes: dict) -> Path:
    """A copy of a run (config, checkpoint, history, W&B files) with config sections changed;
    W&B is switched off unless asked for, to keep the tests fast."""
    target = dest / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("eval", "last.pt"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["logging"]["wandb_mode"] = wandb_mode
    for section, values in config_changes.items():
        config[section].update(values)
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    return target


def run_data(run: Path):
    return prepare_data(load_config(run / "config.yaml").data, progress=False)


@pytest.fixture(scope="module")
def pylon_eval(tiny_run, tmp_path_factory):
    """The tiny PYLON run evaluated with --localization, W&B offline (resuming its run)."""
    work = tmp_path_factory.mktemp("pylon-eval")
    run = copy_run(tiny_run, work, wandb_mode="offline")
    with pytest.MonkeyPatch.context() as env:
        for key, value in quiet_wandb_env(work / "wandb-home").items():
            env.setenv(key, value)
        metrics = run_evaluate(run, "--localization")
    return run, metrics


@pytest.fixture(scope="module")
def baseline_run(tiny_data, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("baseline-runs")
    overrides = tiny_overrides(tiny_data, runs, "train.epochs=1", "train.max_steps_per_epoch=2")
    args = ["--config", "demo_baseline.yaml", "--set", *overrides]
    assert load_script("train").main(args) == 0
    (run,) = run_folders(runs)
    return run


def check_block(block: dict, n: int) -> None:
    for key in CONTRACT_KEYS:
        assert key in block, key
    assert block["n"] == n and isinstance(block["n"], int)
    for key in ("accuracy", "sensitivity", "specificity", "f1", "precision", "ece"):
        assert block[key] is None or 0.0 <= block[key] <= 1.0, (key, block[key])
    for key, (low, high) in block["ci"].items():
        assert low is None or low <= high, key


def test_metrics_json_has_the_contract_keys_and_consistent_counts(pylon_eval):
    run, metrics = pylon_eval
    data = run_data(run)
    test = data.records("test")
    c = metrics["classification"]
    check_block(c, len(test))
    assert isinstance(c["auroc"], float) and c["split"] == "test"
    assert set(c["ci"]) == set(CI_METRICS)
    assert set(c["by_source"]) == {"kaggle", "rsna"}
    for source, block in c["by_source"].items():
        check_block(block, sum(r.source == source for r in test))
    assert sum(b["n"] for b in c["by_source"].values()) == c["n"]
    views = {r.view for r in test if r.source == "rsna"}
    assert set(c["by_view"]) == views
    for view, block in c["by_view"].items():
        check_block(block, sum(r.source == "rsna" and r.view == view for r in test))
    youden = c["threshold_youden"]
    assert youden["chosen_on"] == "val" and 0.0 <= youden["threshold"] <= 1.0
    assert set(youden["ci"]) == set(CI_METRICS) - {"auroc"}

    for name in CLASSIFICATION_FIGURES + LOCALIZATION_FIGURES:
        path = run / "eval" / name
        assert path.is_file() and Image.open(path).size[0] > 100, name
    predictions = pd.read_csv(run / "eval" / "predictions.csv")
    assert list(predictions.columns) == ["id", "source", "view", "label", "prob", "split", "patient_id"]
    assert (predictions.split == "test").sum() == c["n"]
    assert (predictions.split == "val").sum() == len(data.rows["val"])


def test_classification_numbers_are_those_of_the_saved_predictions(pylon_eval):
    run, metrics = pylon_eval
    c = metrics["classification"]
    predictions = pd.read_csv(run / "eval" / "predictions.csv")
    val, test = predictions[predictions.split == "val"], predictions[predictions.split == "test"]
    # The operating point is chosen on val, never on test.
    threshold = youden_threshold(val.label, val.prob)
    assert c["threshold_youden"]["threshold"] == pytest.approx(threshold, abs=1e-6)  # stored at training, float32
    at_youden = classification_metrics(test.label, test.prob, threshold)
    for key in ("accuracy", "sensitivity", "specificity", "f1", "tp", "fp", "tn", "fn"):
        assert c["threshold_youden"][key] == pytest.approx(at_youden[key]), key
    assert c["auroc"] == pytest.approx(roc_auc_score(test.label, test.prob))
    kaggle = test[test.source == "kaggle"]
    assert c["by_source"]["kaggle"]["accuracy"] == pytest.approx(((kaggle.prob >= 0.5) == kaggle.label).mean())


def test_localization_scores_pylon_and_the_image_blind_baselines_in_both_frames(pylon_eval):
    run, metrics = pylon_eval
    data = run_data(run)
    boxed = [r for r in data.rows["test"] if data.cache.records[r].scored_boxes]
    assert boxed, "the tiny data set must put boxed RSNA images in test"
    loc = metrics["localization"]
    assert set(loc) == {"pylon", "prior", "center"}
    views = {data.cache.records[r].view for r in boxed}
    for entry in loc.values():
        assert entry["n"] == len(boxed)
        for key in ("point_acc", "pointing_game_15px", "energy_in_box"):
            assert 0.0 <= entry[key] <= 1.0
            low, high = entry["ci"][key]
            assert low <= entry[key] <= high
        assert entry["n_laterality"] <= entry["n"]
        assert set(entry["by_view"]) == views
        assert sum(block["n"] for block in entry["by_view"].values()) == entry["n"]

    # The centre baseline, recomputed from the records: its point is the middle pixel of the
    # 64 px input, and it is scored against cache-frame boxes, then in the 1024 px original.
    size = data.cache.image_size
    centre = np.array([[size / 2 - 0.5, size / 2 - 0.5]] * len(boxed))
    in_input = pointing_game(centre, [data.cache.boxes_in_cache_frame(r) for r in boxed], tolerance=0)
    original = np.concatenate([data.cache.to_original(r, c[None]) for r, c in zip(boxed, centre)])
    in_original = pointing_game(original, [data.cache.records[r].scored_boxes for r in boxed], tolerance=15)
    assert loc["center"]["point_acc"] == pytest.approx(np.nanmean(in_input))
    assert loc["center"]["pointing_game_15px"] == pytest.approx(np.nanmean(in_original))

    # The prior is the training split's mean box mask, stored with the run: its point is fixed.
    prior = box_prior([data.cache.boxes_in_cache_frame(r) for r in data.rows["train"]], size)
    prior_point = argmax_points(prior[None], (size, size))[0]
    in_box = pointing_game([prior_point] * len(boxed), [data.cache.boxes_in_cache_frame(r) for r in boxed], tolerance=0)
    assert loc["prior"]["point_acc"] == pytest.approx(np.nanmean(in_box))

    frame = pd.read_csv(run / "eval" / "localization.csv")
    assert len(frame) == 3 * len(boxed)
    assert np.allclose(frame[frame.method == "prior"][["point_x_input", "point_y_input"]], prior_point)
    assert frame[frame.method == "pylon"].energy_in_box.mean() == pytest.approx(loc["pylon"]["energy_in_box"])
    # The cache stretches the square RSNA originals to 64 px: one factor per image, both axes.
    row_of = {rec.id: row for row, rec in enumerate(data.cache.records)}
    scale = np.array([data.cache.geometry[row_of[i]].scale_x for i in frame.id])
    assert (scale < 1).all()
    assert np.allclose(frame.point_x, frame.point_x_input / scale)
    assert np.allclose(frame.point_y, frame.point_y_input / scale)
    pylon_rows = frame[frame.method == "pylon"]
    assert pylon_rows.point_acc_hit.mean() == pytest.approx(loc["pylon"]["point_acc"])

    # Each map minus the prior, paired image by image: the difference of the means, and an interval
    # over resampled patients that moves both together.
    for method in ("pylon", "center"):
        gap = loc[method]["minus_prior"]
        assert gap["n"] == len(boxed)
        for key in ("point_acc", "energy_in_box"):
            assert gap[key] == pytest.approx(loc[method][key] - loc["prior"][key])
            low, high = gap["ci"][key]
            assert low <= gap[key] <= high
    assert "minus_prior" not in loc["prior"]


def test_evaluation_continues_the_runs_wandb_run(pylon_eval):
    run, _ = pylon_eval
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # training's, then evaluation's
    assert len({f.name.rsplit("-", 1)[1] for f in folders}) == 1  # one W&B run id: resumed
    assert all(next(f.glob("run-*.wandb")).stat().st_size > 0 for f in folders)
    # One key per figure: W&B shows same-key images side by side and wants them one size.
    rows = [r["history"]["item"] for r in read_wandb_records(folders[-1]) if r["type"] == "history"]
    keys = {k.split(".")[0] for row in rows for k in row if k.startswith("eval/figures/")}
    assert {"eval/figures/roc", "eval/figures/overlays", "eval/figures/failures_localization"} <= keys
    assert all(int(row[f"{key}.count"]) == 1 for row in rows for key in keys if f"{key}.count" in row)


def test_baseline_run_scores_every_cam_method(baseline_run, tmp_path):
    run = copy_run(baseline_run, tmp_path)
    metrics = run_evaluate(run, "--localization", "--set", "eval.bootstrap=50")
    assert set(metrics["localization"]) == {"cam", "gradcam", "gradcam++", "prior", "center"}
    n_boxed = sum(bool(r.boxes) for r in run_data(run).records("test"))
    for entry in metrics["localization"].values():
        assert entry["n"] == n_boxed > 0
        assert 0 <= entry["point_acc"] <= 1 and 0 <= entry["pointing_game_15px"] <= 1
    overlay = Image.open(run / "eval" / "overlays.png")
    assert overlay.size[0] > 5 * overlay.size[1] / n_boxed  # image + five method columns


def test_methods_from_config_and_the_baselines_always_added(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    metrics = run_evaluate(run, "--localization", "--set", "eval.methods=[pylon]", "eval.n_overlays=2")
    assert set(metrics["localization"]) == {"pylon", "prior", "center"}
    table = capsys.readouterr().out
    for column in ("method", "point_acc", "pointing_game_15px", "energy_in_box", "laterality"):
        assert column in table
    with pytest.raises(ConfigError, match="gradcam.*not available"):
        evaluate.main(["--run", str(run), "--localization", "--set", "eval.methods=[gradcam]"])


def test_a_split_without_boxes_gives_an_empty_localization_with_a_note(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path, data={"sources": ["kaggle"]})
    metrics = run_evaluate(run, "--localization")
    assert metrics["localization"] == {}
    assert "no images with boxes" in metrics["localization_note"]
    assert "no images with boxes in the test split" in capsys.readouterr().out
    assert set(metrics["classification"]["by_source"]) == {"kaggle"}
    assert metrics["classification"]["by_view"] == {}


def test_val_split_and_latest_run_and_user_errors(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    assert evaluate.main(["--runs-dir", str(tmp_path), "--split", "val"]) == 0  # the latest (only) run
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "val" and "same (val) split" in metrics["classification"]["threshold_youden"]["note"]
    assert metrics["classification"]["n"] == len(run_data(run).rows["val"])
    assert "localization" not in metrics
    with pytest.raises(ConfigError, match="model.backbone"):
        evaluate.main(["--run", str(run), "--set", "model.backbone=resnet34"])
    with pytest.raises(ConfigError, match="not a run folder"):
        evaluate.main(["--run", str(tmp_path / "nowhere")])
    edited = copy_run(tiny_run, tmp_path / "edited", model={"backbone": "resnet34"})
    with pytest.raises(ConfigError, match="disagree on model.backbone"):
        evaluate.main(["--run", str(edited)])


def test_an_unwritable_out_fails_before_any_data_is_loaded(tiny_run, tmp_path, monkeypatch):
    import pylon.evaluation

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(pylon.evaluation, "prepare_data", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(ConfigError, match="--out=.*a-file/eval is not writable .*give --out <a folder you can write>"):
        evaluate.main(["--run", str(tiny_run), "--out", str(blocker / "eval")])


def test_a_run_whose_checkpoints_were_deleted_says_they_are_missing(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ConfigError, match="has no checkpoints/best.pt: it is missing, though history.csv shows "
                                          "trained epochs"):
        evaluate.main(["--run", str(run)])


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_interrupted_evaluation_leaves_the_previous_one_whole(tiny_run, tmp_path, monkeypatch):
    import pylon.evaluation

    run = copy_run(tiny_run, tmp_path)
    run_evaluate(run, "--split", "val", "--localization", "--set", "eval.bootstrap=0")
    before = files_of(run / "eval")

    def interrupted(*args, **kwargs):  # after the first figures of the new evaluation were written
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pylon.evaluation, "misclassified_gallery", interrupted)
        with pytest.raises(KeyboardInterrupt):
            evaluate.main(["--run", str(run), "--set", "eval.bootstrap=0"])
    assert files_of(run / "eval") == before  # not a mix of the test split's figures and val's metrics
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []

    metrics = run_evaluate(run, "--set", "eval.bootstrap=0")  # completed: the previous files are all replaced
    assert metrics["split"] == "test" and not (run / "eval" / "localization.csv").exists()


def test_other_data_without_out_leaves_the_runs_own_evaluation_alone(tiny_run, tiny_data, tmp_path, monkeypatch):
    import pylon.evaluation

    run = copy_run(tiny_run, tmp_path)
    monkeypatch.setattr(pylon.evaluation, "prepare_data", lambda *a, **k: pytest.fail("data loaded"))
    for args in (["--split", "all"], ["--set", "data.sources=[rsna]"], ["--set", f"data.roots.rsna={tmp_path}"]):
        with pytest.raises(ConfigError, match=f"is not the run's own test data: give --out DIR for its results, "
                                              f"so that {run / 'eval'} stays the run's own evaluation"):
            evaluate.main(["--run", str(run), *args])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--out .*notes holds files but no evaluation"):
        evaluate.main(["--run", str(run), "--out", str(tmp_path / "notes")])
    assert not (run / "eval").exists() and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_loaded_run_reads_its_config_once_and_keeps_the_data_it_was_trained_on(tiny_run, tmp_path, monkeypatch):
    import pylon.inference
    from pylon.runs import RunPaths

    reads = []
    monkeypatch.setattr(pylon.inference, "load_config", lambda *a, **k: reads.append(a) or load_config(*a, **k))
    trained = pylon.inference.load_run(RunPaths(tiny_run), [f"data.roots.rsna={tmp_path}"])
    assert len(reads) == 1 and trained.cfg.data.roots.rsna == str(tmp_path)
    assert trained.trained_data.roots.rsna == load_config(tiny_run / "config.yaml", stored=True).data.roots.rsna


def external_rsna_roots(tiny_data: Path) -> list[Path]:
    """RSNA-layout folders to score a run on: the generated one, and real DICOMs when present."""
    from conftest import realdata_root

    real = realdata_root() / "rsna_sample"
    return [tiny_data / "rsna"] + ([real] if real.is_dir() else [])


def test_external_evaluation_scores_every_image_with_the_runs_stored_threshold_and_prior(tiny_run, tiny_data,
                                                                                        tmp_path):
    run = copy_run(tiny_run, tmp_path)
    stored = load_checkpoint(run / "checkpoints" / "best.pt")
    size = load_config(run / "config.yaml").data.image_size
    prior_point = argmax_points(stored["prior"][None], (size, size))[0]
    for i, root in enumerate(external_rsna_roots(tiny_data)):
        out = tmp_path / f"external-{i}"
        assert evaluate.main(["--localization", "--run", str(run), "--set", "data.sources=[rsna]",
                              f"data.roots.rsna={root}", "eval.split=all", "eval.bootstrap=20", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        labels = pd.read_csv(root / "stage_2_train_labels.csv")
        patients = labels.groupby("patientId").Target.max()
        c = metrics["classification"]
        assert metrics["split"] == "all" and c["n"] == len(patients) and c["n_pos"] == patients.sum()
        check_block(c, len(patients))
        assert set(c["by_source"]) == {"rsna"}
        assert c["threshold_youden"]["threshold"] == pytest.approx(stored["threshold_youden"])
        loc = metrics["localization"]
        assert set(loc) == {"pylon", "prior", "center"}
        assert all(entry["n"] == patients.sum() for entry in loc.values())
        frame = pd.read_csv(out / "localization.csv")
        assert np.allclose(frame[frame.method == "prior"][["point_x_input", "point_y_input"]], prior_point)
        predictions = pd.read_csv(out / "predictions.csv")
        assert set(predictions.split) == {"all"} and len(predictions) == len(patients)
        assert (out / "overlays.png").is_file()
    assert not (run / "eval").exists()  # the in-distribution evaluation folder is left alone


def test_evaluation_scores_the_runs_own_split_from_any_folder_and_stops_when_the_data_changed(
        tiny_run, tmp_path, monkeypatch):
    run = copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tmp_path)  # the run's config holds absolute roots: found from anywhere
    assert run_evaluate(run, "--set", "eval.bootstrap=0")["classification"]["n"] == len(run_data(run).rows["test"])

    manifest = pd.read_csv(run / "splits.csv")
    changed = manifest.copy()
    first_test = changed.index[changed.split == "test"][0]
    changed.loc[first_test, "label"] = 1 - changed.loc[first_test, "label"]
    changed.to_csv(run / "splits.csv", index=False)
    with pytest.raises(ConfigError, match=r"no longer matches the run's split manifest .*1 of its images"):
        evaluate.main(["--run", str(run)])
    manifest.to_csv(run / "splits.csv", index=False)

    # Data that is gone is reported, never generated anew, even for a demo config's folders.
    moved = copy_run(tiny_run, tmp_path / "moved", data={"roots": {"kaggle": str(tmp_path / "gone" / "kaggle"),
                                                                   "rsna": str(tmp_path / "gone" / "rsna")}})
    with pytest.raises(ConfigError, match="data.roots.kaggle"):
        evaluate.main(["--run", str(moved)])
    assert not (tmp_path / "gone").exists()


def test_a_confident_pylon_map_keeps_its_peak(tiny_run):
    """Logits between ~17 and ~36 saturate a float32 sigmoid to 1.0 everywhere, and the peak would fall
    to the first pixel; localization keeps heatmaps' float64, so shifting every logit moves no peak."""
    import torch

    from pylon.evaluation import localize
    from pylon.inference import load_run
    from pylon.runs import RunPaths

    trained = load_run(RunPaths(tiny_run))
    data = prepare_data(trained.cfg.data, progress=False)
    base = localize(trained, data, "test", ["pylon"])
    with torch.no_grad():
        trained.model.head.bias += 25.0
    shifted = localize(trained, data, "test", ["pylon"])
    assert base.rows.size >= 2
    cell = 4  # one heatmap pixel: PYLON maps are at 1/4 of the input
    assert np.abs(np.subtract(shifted.points["pylon"], base.points["pylon"])).max() <= cell


def test_views_are_grouped_within_rsna_only():
    """NIH records carry AP/PA too; per-view reports (classification and localization) keep RSNA's apart."""
    from pylon.data.records import Record
    from pylon.data.sources import report_group

    assert report_group(Record("a", "a", "rsna", "a.dcm", 1, view="AP")) == "AP"
    assert report_group(Record("b", "b", "nih", "b.png", 1, view="PA")) == ""
    assert report_group(Record("c", "c", "rsna", "c.dcm", 0)) == ""


def test_metrics_say_at_which_precision_the_run_was_trained_and_evaluated(tiny_run, tmp_path):
    from pylon.checkpoint import load_checkpoint
    from pylon.runs import RunPaths

    run = copy_run(tiny_run, tmp_path)
    metrics = run_evaluate(run, "--set", "train.amp=false")
    assert metrics["precision"] == "fp32"  # amp off evaluates in fp32 whatever the run trained at
    assert metrics["trained_precision"] == load_checkpoint(RunPaths(tiny_run).best)["precision"]

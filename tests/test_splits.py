"""split_records: patient-level, stratified, seeded, Kaggle's official test kept, no leakage."""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

import pytest

from pylon.data.records import Record
from pylon.data.splits import PatientLeakageError, assert_no_patient_leakage, split_records


def split(records: list[Record], seed: int = 0, val: float = 0.1, test: float = 0.1) -> list[Record]:
    return split_records(records, val_fraction=val, test_fraction=test, seed=seed)


def rsna_records(n_patients: int = 400, positive_every: int = 4) -> list[Record]:
    return [
        Record(id=f"r{i}", patient_id=f"r{i}", source="rsna", path=f"r{i}.dcm",
               label=int(i % positive_every == 0))
        for i in range(n_patients)
    ]


def kaggle_records(n_patients: int = 300, n_test_patients: int = 60, n_overlap: int = 5) -> list[Record]:
    """Patients with 1-4 images each; the first n_test_patients are in the official test,
    of which n_overlap also have official train images (as in the real data)."""
    rng = random.Random(7)
    records = []
    for p in range(n_patients):
        label = int(p % 3 != 0)  # about two thirds pneumonia, like the real set
        folder = "PNEUMONIA" if label else "NORMAL"
        if p < n_test_patients:
            splits = ["test"] * rng.randint(1, 3) + (["train"] * 2 if p < n_overlap else [])
        else:
            splits = [("val" if p % 50 == 0 else "train")] * rng.randint(1, 4)
        for k, split in enumerate(splits):
            records.append(Record(id=f"kaggle/{split}/{folder}/person{p}_{k}", patient_id=f"kaggle-person{p}",
                                  source="kaggle", path=f"{p}_{k}.jpeg", label=label, split=split))
    return records


def patients_by_split(records: list[Record]) -> dict[str, set[str]]:
    result = defaultdict(set)
    for record in records:
        result[record.split].add(record.patient_id)
    return result


def test_every_record_is_split_without_leakage():
    records = kaggle_records(n_overlap=0) + rsna_records()
    result = split(records, seed=3)
    assert [r.id for r in result] == [r.id for r in records]  # order and membership kept
    assert all(r.split in ("train", "val", "test") for r in result)
    parts = patients_by_split(result)
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert_no_patient_leakage(result)
    # nothing else about a record changes
    assert [replace(r, split=None) for r in result] == [replace(r, split=None) for r in records]


def test_rsna_split_is_stratified_and_sized():
    records = rsna_records(n_patients=1000, positive_every=4)  # 250 positive, 750 negative
    result = split(records, val=0.1, test=0.2)
    counts = Counter((r.split, r.label) for r in result)
    assert counts[("test", 1)] == 50 and counts[("test", 0)] == 150
    assert counts[("val", 1)] == 20 and counts[("val", 0)] == 60  # 10% of the remaining 80%
    assert counts[("train", 1)] == 180 and counts[("train", 0)] == 540


def test_kaggle_official_test_is_kept_and_val_carved_from_pool():
    records = kaggle_records(n_overlap=0)
    result = split(records, seed=1, val=0.2)
    official = {r.id for r in records if r.split == "test"}
    assert {r.id for r in result if r.split == "test"} == official
    pool = [r for r in records if r.split != "test"]
    pool_patients = {r.patient_id: r.label for r in pool}
    val_patients = {r.patient_id: r.label for r in result if r.split == "val"}
    for label in (0, 1):
        n_pool = sum(1 for v in pool_patients.values() if v == label)
        n_val = sum(1 for v in val_patients.values() if v == label)
        assert n_val == round(0.2 * n_pool)
    # the official val images are pooled, not kept as val
    official_val = {r.id for r in records if r.split == "val"}
    assert any(r.split == "train" for r in result if r.id in official_val)


def test_kaggle_patients_in_official_train_and_test(caplog):
    records = kaggle_records(n_overlap=5)
    leaking = {f"kaggle-person{p}" for p in range(5)}
    outside = {r.id for r in records if r.patient_id in leaking and r.split != "test"}
    assert len(outside) == 10

    dropped = split(records)
    assert {r.id for r in dropped} == {r.id for r in records} - outside
    assert "5 patients" in caplog.text and "their 10 non-test images were dropped" in caplog.text
    assert {r.split for r in dropped if r.patient_id in leaking} == {"test"}


def test_deterministic_by_seed_and_independent_of_input_order():
    records = kaggle_records() + rsna_records()
    first = split(records, seed=11)
    assert split(records, seed=11) == first
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    assert {r.id: r.split for r in split(shuffled, seed=11)} == {r.id: r.split for r in first}
    other = split(records, seed=12)
    assert [r.split for r in other] != [r.split for r in first]


def test_split_is_stable_when_patients_are_added():
    base = rsna_records(n_patients=1000)
    before = {r.id: r.split for r in split(base)}
    extra = [Record(id=f"new{i}", patient_id=f"new{i}", source="rsna", path="x", label=i % 2) for i in range(10)]
    after = {r.id: r.split for r in split(base + extra)}
    moved = sum(before[i] != after[i] for i in before)
    assert moved <= 20  # a handful at the cut points, not a reshuffle


def test_resplitting_a_split_is_a_no_op():
    records = kaggle_records(n_overlap=0) + rsna_records()
    once = split(records, seed=5)
    assert split(once, seed=5) == once


def test_leakage_check_names_the_patient():
    records = [
        Record(id="a1", patient_id="pa", source="rsna", path="a1", label=0, split="train"),
        Record(id="b1", patient_id="pb", source="rsna", path="b1", label=1, split="train"),
        Record(id="b2", patient_id="pb", source="rsna", path="b2", label=1, split="test"),
    ]
    with pytest.raises(PatientLeakageError, match=r"pb: test \(b2\), train \(b1\)"):
        assert_no_patient_leakage(records)
    assert_no_patient_leakage(records[:2])


def test_folds_partition_the_patients_and_keep_each_fold_stratified():
    records = rsna_records(403) + kaggle_records()
    tests = []
    for fold in range(5):
        result = split_records(records, val_fraction=0.1, test_fraction=0.3, seed=3, folds=(5, fold))
        by_split = patients_by_split([r for r in result if r.source == "rsna"])
        assert not by_split["test"] & (by_split["train"] | by_split["val"])
        assert len(by_split["val"]) == pytest.approx(0.1 * (403 - len(by_split["test"])), abs=2)
        positives = sum(r.label for r in result if r.source == "rsna" and r.split == "test")
        assert positives in (20, 21)  # 101 positives in 5 folds
        kaggle = [r for r in result if r.source == "kaggle"]
        assert kaggle == [r for r in split(records, seed=3) if r.source == "kaggle"]  # official test kept
        tests.append(by_split["test"])
    assert set().union(*tests) == {f"r{i}" for i in range(403)}
    assert sum(map(len, tests)) == 403  # every patient tested exactly once


def test_a_patient_map_keeps_a_persons_films_in_one_split(tmp_path, caplog):
    from pylon.data.records import with_patient_map

    films = rsna_records(200)
    csv_path = tmp_path / "map.csv"
    # films r0..r99 belong to 50 people, two each; r100.. are not in the map
    csv_path.write_text("patientId,nih_image,nih_patient\n" + "".join(f"r{i},x.png,{i // 2:08d}\n" for i in range(100)))
    with caplog.at_level("INFO"):
        mapped = with_patient_map(films, csv_path, "data.patient_maps.rsna")
    assert "200 images belong to 150 people (100 images not in the map" in caplog.text
    assert mapped[0].patient_id == mapped[1].patient_id != mapped[2].patient_id
    assert mapped[150].patient_id == "r150"
    for folds in [None, (3, 0), (3, 2)]:
        by_patient = defaultdict(set)
        for r in split_records(mapped, val_fraction=0.2, test_fraction=0.3, seed=1, folds=folds):
            by_patient[r.patient_id].add(r.split)
        assert all(len(s) == 1 for s in by_patient.values())


def test_a_patient_map_without_a_patient_column_is_refused_by_name(tmp_path):
    from pylon.data.records import DatasetLayoutError, with_patient_map

    csv_path = tmp_path / "map.csv"
    csv_path.write_text("patientId,person\nr1,7\n")
    with pytest.raises(DatasetLayoutError, match="data.patient_maps.rsna: .* patient or \\*_patient"):
        with_patient_map(rsna_records(3), csv_path, "data.patient_maps.rsna")

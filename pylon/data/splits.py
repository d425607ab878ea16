"""Patient-level, label-stratified, seeded train/val/test splits, and the leakage check.

Rules:
- Kaggle keeps its official test split. Its official train and val images are pooled and
  `val_fraction` of the pool's patients become val.
- RSNA (and any other source) has no official split: `rsna_test_fraction` of its patients
  become test, then `val_fraction` of the remaining patients become val.
- Within every source the patients of each label are ranked by a seeded hash of their id
  and cut at the fraction, so the split is exactly stratified, the same on every machine
  for a given seed, and stable: adding or removing other patients moves few patients.
- A patient never straddles splits. The official Kaggle split does share patients between
  train and test (same `personN` in both); `on_test_overlap` says what happens to their
  train/val images ('drop' by default, so the official test set stays as published).
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from typing import Iterable, Literal, Sequence

from .records import Record

logger = logging.getLogger(__name__)

KNOWN_SOURCES = ("kaggle", "rsna")
SOURCES_WITH_OFFICIAL_TEST = ("kaggle",)

OverlapPolicy = Literal["drop", "test", "error"]


class PatientLeakageError(ValueError):
    """A patient's images sit in more than one split."""


def split_records(
    records: Sequence[Record],
    *,
    val_fraction: float = 0.1,
    rsna_test_fraction: float = 0.1,
    seed: int = 0,
    on_test_overlap: OverlapPolicy = "drop",
) -> list[Record]:
    """Every record with its split set, in the input order.

    on_test_overlap: for a patient with images in an official test split and outside it,
    'drop' leaves the outside images out of the result (logged), 'test' moves them into
    test, 'error' raises PatientLeakageError.
    """
    for name, value in (("val_fraction", val_fraction), ("rsna_test_fraction", rsna_test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if on_test_overlap not in ("drop", "test", "error"):
        raise ValueError(f"on_test_overlap must be 'drop', 'test' or 'error', got {on_test_overlap!r}")
    _check_unique_ids(records)

    by_source: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_source[record.source].append(index)

    assigned: dict[int, str] = {}
    dropped: set[int] = set()
    for source, indices in sorted(by_source.items()):
        if source in SOURCES_WITH_OFFICIAL_TEST:
            _split_with_official_test(
                records, indices, val_fraction, seed, on_test_overlap, assigned, dropped
            )
        else:
            patient_split = _stratified_patients(records, indices, [rsna_test_fraction, val_fraction], seed)
            for i in indices:
                assigned[i] = ("test", "val", "train")[patient_split[records[i].patient_id]]

    result = [records[i].with_split(assigned[i]) for i in range(len(records)) if i not in dropped]
    assert_no_patient_leakage(result)
    return result


def _split_with_official_test(
    records: Sequence[Record],
    indices: list[int],
    val_fraction: float,
    seed: int,
    on_test_overlap: OverlapPolicy,
    assigned: dict[int, str],
    dropped: set[int],
) -> None:
    test_patients = {records[i].patient_id for i in indices if records[i].split == "test"}
    pool = []
    overlapping = defaultdict(int)
    for i in indices:
        record = records[i]
        if record.split == "test":
            assigned[i] = "test"
        elif record.patient_id in test_patients:
            overlapping[record.patient_id] += 1
            if on_test_overlap == "error":
                raise PatientLeakageError(
                    f"patient {record.patient_id} has images in the official test split and "
                    f"outside it (e.g. {record.id}); pass on_test_overlap='drop' or 'test'"
                )
            if on_test_overlap == "drop":
                dropped.add(i)
            else:
                assigned[i] = "test"
        else:
            pool.append(i)
    if overlapping:
        action = "dropped" if on_test_overlap == "drop" else "moved to test"
        logger.warning(
            "%s: %d patients have images in the official test split and outside it; their %d "
            "non-test images were %s to keep test patients out of training (e.g. %s)",
            records[indices[0]].source, len(overlapping), sum(overlapping.values()), action,
            ", ".join(sorted(overlapping)[:5]),
        )
    patient_split = _stratified_patients(records, pool, [val_fraction], seed)
    for i in pool:
        assigned[i] = ("val", "train")[patient_split[records[i].patient_id]]


def _stratified_patients(
    records: Sequence[Record], indices: list[int], fractions: list[float], seed: int
) -> dict[str, int]:
    """Patient -> part index: parts 0..k-1 take fractions[j] of the patients of each label
    (each taken from what is left after the previous parts); part k takes the rest."""
    label_of: dict[str, int] = {}
    for i in indices:
        patient = records[i].patient_id
        label_of[patient] = max(label_of.get(patient, 0), int(records[i].label))
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, label in label_of.items():
        strata[label].append(patient)

    part_of: dict[str, int] = {}
    for patients in strata.values():
        remaining = sorted(patients, key=lambda p: (_seeded_rank(seed, p), p))
        for part, fraction in enumerate(fractions):
            take = int(round(fraction * len(remaining)))
            for patient in remaining[:take]:
                part_of[patient] = part
            remaining = remaining[take:]
        for patient in remaining:
            part_of[patient] = len(fractions)
    return part_of


def _seeded_rank(seed: int, patient_id: str) -> bytes:
    # A cryptographic hash rather than hash(): identical across processes and machines.
    return hashlib.blake2b(f"{seed}:{patient_id}".encode(), digest_size=8).digest()


def assert_no_patient_leakage(records: Iterable[Record]) -> None:
    """Raise PatientLeakageError naming a patient whose images are in two splits."""
    splits_of: dict[str, dict[str, str]] = defaultdict(dict)
    for record in records:
        splits_of[record.patient_id].setdefault(str(record.split), record.id)
    leaking = {p: s for p, s in splits_of.items() if len(s) > 1}
    if leaking:
        patient = sorted(leaking)[0]
        where = ", ".join(f"{split} ({example})" for split, example in sorted(leaking[patient].items()))
        raise PatientLeakageError(
            f"{len(leaking)} patient(s) appear in more than one split, e.g. {patient}: {where}"
        )


def select_sources(records: Iterable[Record], sources: Iterable[str]) -> list[Record]:
    """The records whose source is one of `sources` (names checked, e.g. from a config)."""
    wanted = set(sources)
    unknown = wanted - set(KNOWN_SOURCES)
    if unknown:
        raise ValueError(f"unknown data source(s) {sorted(unknown)}; known: {list(KNOWN_SOURCES)}")
    return [r for r in records if r.source in wanted]


def merge_sources(*record_lists: Iterable[Record]) -> list[Record]:
    """Concatenate indexes (e.g. index_kaggle(...) and index_rsna(...)); ids must stay unique."""
    merged = [record for records in record_lists for record in records]
    _check_unique_ids(merged)
    return merged


def _check_unique_ids(records: Sequence[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"record id {record.id!r} occurs more than once")
        seen.add(record.id)

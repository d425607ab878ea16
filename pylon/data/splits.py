"""Patient-level, label-stratified, seeded train/val/test splits, and the leakage check.

- A source with an official test split (OFFICIAL_TEST, e.g. Kaggle) keeps it; `val_fraction` of the patients of its
  pooled official train and val become val. Patients in test and outside it lose their non-test images.
- Any other source: `test_fraction` of its patients become test, then `val_fraction` of the rest val. With
  ``folds=(k, i)`` (cross-validation) the patients of each label are cut into k folds and fold i is the test split
  instead: the k test splits of one seed partition the source's patients, so k runs score every image once.
- Within every source the patients of each label are ranked by a seeded hash of their id and cut at the fraction:
  exactly stratified, identical on every machine for a given seed, and stable (adding patients moves few others).
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import replace
from typing import Iterable, Optional, Sequence

from pylon.data.records import Record
from pylon.data.sources import SOURCES

log = logging.getLogger(__name__)


class PatientLeakageError(ValueError):
    """A patient's images sit in more than one split."""


def split_records(records: Sequence[Record], *, val_fraction: float, test_fraction: float, seed: int,
                  folds: Optional[tuple[int, int]] = None) -> list[Record]:
    """Every record with its split set, in the input order (less any dropped overlap images); ``folds=(k, i)``
    makes fold i of k the test split of sources without an official one."""
    assigned: dict[int, str] = {}
    for source in sorted({r.source for r in records}):
        indices = [i for i, r in enumerate(records) if r.source == source]
        if not SOURCES[source].OFFICIAL_TEST:
            fractions = [val_fraction] if folds else [test_fraction, val_fraction]
            part = _stratified_patients(records, indices, fractions, seed, folds)
            assigned.update((i, ("test", "val", "train")[part[records[i].patient_id]]) for i in indices)
            continue
        test_patients = {records[i].patient_id for i in indices if records[i].split == "test"}
        overlap = [i for i in indices if records[i].split != "test" and records[i].patient_id in test_patients]
        if overlap:
            patients = sorted({records[i].patient_id for i in overlap})
            log.warning("%s: %d patients have images in the official test split and outside it; their %d "
                        "non-test images were dropped to keep test patients out of training (e.g. %s)",
                        source, len(patients), len(overlap), ", ".join(patients[:5]))
        pool = [i for i in indices if records[i].patient_id not in test_patients]
        part = _stratified_patients(records, pool, [val_fraction], seed)
        assigned.update((i, "test") for i in indices if records[i].split == "test")
        assigned.update((i, ("val", "train")[part[records[i].patient_id]]) for i in pool)
    result = [replace(records[i], split=assigned[i]) for i in range(len(records)) if i in assigned]
    assert_no_patient_leakage(result)
    return result


def _stratified_patients(records: Sequence[Record], indices: list[int], fractions: list[float], seed: int,
                         folds: Optional[tuple[int, int]] = None) -> dict[str, int]:
    """Patient -> part: parts 0..k-1 take fractions[j] of the patients of each label (each from what the previous
    parts left); part k takes the rest. With ``folds=(n, i)`` fold i of n is part 0 and the fractions number the
    parts from 1. A patient with a positive image is positive."""
    positive = {records[i].patient_id for i in indices if records[i].label}
    patients = {records[i].patient_id for i in indices}
    part_of: dict[str, int] = {}
    for stratum in (patients - positive, positive):
        # a cryptographic hash rather than hash(): identical across processes and machines
        remaining = sorted(stratum, key=lambda p: (hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest(), p))
        if folds:
            n, i = folds
            low, high = (round(j * len(remaining) / n) for j in (i, i + 1))
            part_of.update((p, 0) for p in remaining[low:high])
            remaining = remaining[:low] + remaining[high:]
        for part, fraction in enumerate(fractions, start=1 if folds else 0):
            take = int(round(fraction * len(remaining)))
            part_of.update((p, part) for p in remaining[:take])
            remaining = remaining[take:]
        part_of.update((p, len(fractions) + bool(folds)) for p in remaining)
    return part_of


def assert_no_patient_leakage(records: Iterable[Record]) -> None:
    """Raise PatientLeakageError naming a patient whose images are in two splits."""
    splits_of: dict[str, dict[str, str]] = defaultdict(dict)
    for record in records:
        splits_of[record.patient_id].setdefault(str(record.split), record.id)
    leaking = sorted(p for p, s in splits_of.items() if len(s) > 1)
    if leaking:
        where = ", ".join(f"{split} ({example})" for split, example in sorted(splits_of[leaking[0]].items()))
        raise PatientLeakageError(f"{len(leaking)} patient(s) appear in more than one split, "
                                  f"e.g. {leaking[0]}: {where}")

"""Index the Kaggle "Chest X-Ray Images (Pneumonia)" set (Kermany et al.) into Records.

Layout: root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (.jpg and .png too).
The label comes from the folder, the official split is kept in Record.split, and the
patient is parsed from the file name so that a splitter can keep each child's images
together:
    person1_bacteria_1.jpeg     -> kaggle-person1        (detail_class 'bacteria')
    person1_virus_7.jpeg        -> kaggle-person1        (detail_class 'virus')
    IM-0115-0001.jpeg           -> kaggle-IM-0115        (detail_class 'normal')
    NORMAL2-IM-1427-0001.jpeg   -> kaggle-NORMAL2-IM-1427
Names that fit none of these are logged and become a patient of their own.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

from .readers import DatasetLayoutError
from .records import Record
from .report import IndexReport

logger = logging.getLogger(__name__)

OFFICIAL_SPLITS = ("train", "val", "test")
LABEL_FOLDERS = {"NORMAL": 0, "PNEUMONIA": 1}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

_PERSON = re.compile(r"(person\d+)_(bacteria|virus)_\d+(?:_\d+)*", re.IGNORECASE)
_IM = re.compile(r"((?:NORMAL2-)?IM-\d+)(?:-\d+)+", re.IGNORECASE)

KAGGLE_POLICY = {
    "unparseable_name": "kept; the file is its own patient",
    "label_name_conflict": "kept with the folder's label (name says otherwise)",
    "duplicate_id": "kept; id made unique with the file extension",
    "skipped_file": "ignored (not a .jpeg/.jpg/.png image)",
    "unknown_folder": "ignored (not NORMAL or PNEUMONIA)",
    "patient_in_train_and_test": "kept; split_records removes the leak (see splits.py)",
}


def parse_patient(stem: str) -> tuple[Optional[str], Optional[str]]:
    """(patient_id, detail_class) from a file name without extension; (None, None) if unknown."""
    match = _PERSON.fullmatch(stem)
    if match:
        return f"kaggle-{match.group(1).lower()}", match.group(2).lower()
    match = _IM.fullmatch(stem)
    if match:
        return f"kaggle-{match.group(1).upper()}", None
    return None, None


def find_kaggle_folder(root: Union[str, Path]) -> Path:
    """The folder holding train/val/test: root/chest_xray, or root itself if it is that folder."""
    root = Path(root).resolve()
    for candidate in (root / "chest_xray", root):
        if any((candidate / split).is_dir() for split in OFFICIAL_SPLITS):
            return candidate
    raise DatasetLayoutError(
        f"no Kaggle chest X-ray data under {root}: expected "
        f"chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/*.jpeg"
    )


def index_kaggle(root: Union[str, Path]) -> list[Record]:
    """Records of every Kaggle image under `root`, ordered by split, folder and file name."""
    records, _ = index_kaggle_with_report(root)
    return records


def index_kaggle_with_report(root: Union[str, Path]) -> tuple[list[Record], IndexReport]:
    """index_kaggle, also returning the IndexReport of odd names, files and folders."""
    base = find_kaggle_folder(root)
    report = IndexReport(source="kaggle", policy=dict(KAGGLE_POLICY))
    records: list[Record] = []
    seen_ids: set[str] = set()
    for split in OFFICIAL_SPLITS:
        split_dir = base / split
        if not split_dir.is_dir():
            continue
        for folder in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            label = LABEL_FOLDERS.get(folder.name.upper())
            if label is None:
                report.add("unknown_folder", f"{split}/{folder.name}")
                continue
            for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
                record = _record_for(entry, split, folder.name, label, seen_ids, report)
                if record is not None:
                    records.append(record)
                    seen_ids.add(record.id)

    _report_train_test_patients(records, report)
    report.n_images = len(records)
    report.n_positive = sum(r.label for r in records)
    report.log(logger)
    return records, report


def _record_for(
    entry: os.DirEntry,
    split: str,
    folder: str,
    label: int,
    seen_ids: set[str],
    report: IndexReport,
) -> Optional[Record]:
    name = entry.name
    stem, suffix = os.path.splitext(name)
    if name.startswith("."):
        return None  # .DS_Store and friends
    if suffix.lower() not in IMAGE_SUFFIXES or not entry.is_file():
        report.add("skipped_file", f"{split}/{folder}/{name}")
        return None
    patient, detail = parse_patient(stem)
    if patient is None:
        report.add("unparseable_name", f"{split}/{folder}/{name}")
        patient = f"kaggle-{stem}"
    if label == 0:
        if detail is not None:
            report.add("label_name_conflict", f"{split}/{folder}/{name}")
        detail = "normal"
    record_id = f"kaggle/{split}/{folder}/{stem}"
    if record_id in seen_ids:
        report.add("duplicate_id", f"{split}/{folder}/{name}")
        record_id = f"kaggle/{split}/{folder}/{name}"
    return Record(
        id=record_id,
        patient_id=patient,
        source="kaggle",
        path=str(Path(entry.path)),
        label=label,
        split=split,  # type: ignore[arg-type]
        detail_class=detail,
    )


def _report_train_test_patients(records: list[Record], report: IndexReport) -> None:
    """Count patients whose images the official split puts in test and in train/val."""
    in_test = {r.patient_id for r in records if r.split == "test"}
    outside_test = {r.patient_id for r in records if r.split != "test"}
    for patient in sorted(in_test & outside_test, key=_natural_key):
        report.add("patient_in_train_and_test", patient)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]

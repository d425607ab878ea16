"""The Kaggle "Chest X-Ray Images (Pneumonia)" set (Kermany et al.): pediatric JPEGs, no boxes.

Layout: root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (root may be chest_xray itself). The label comes
from the folder, the official split is kept in Record.split, and the patient is parsed from the file name so that a
splitter keeps each child's images together: person1_bacteria_1.jpeg -> kaggle-person1 (detail_class 'bacteria'),
IM-0115-0001.jpeg -> kaggle-IM-0115, NORMAL2-IM-1427-0001.jpeg -> kaggle-NORMAL2-IM-1427.
"""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

from pylon.data.records import DatasetLayoutError, Record, warn_problems

MARKER = "chest_xray"
OFFICIAL_TEST = True
IDS_NAME_FILMS = False  # its patient ids name people
REPORT_VIEWS = ()  # the download records no view
EXCLUDES: dict[str, str] = {}  # combines with every other source

SPLITS = ("train", "val", "test")
LABEL_FOLDERS = {"NORMAL": 0, "PNEUMONIA": 1}
_PERSON = re.compile(r"(person\d+)_(bacteria|virus)_\d+(?:_\d+)*", re.IGNORECASE)
_IM = re.compile(r"((?:NORMAL2-)?IM-\d+)(?:-\d+)+", re.IGNORECASE)
EFFECTS = {  # what indexing does with each kind of problem, said in its warning
    "unknown_folder": "folder skipped", "skipped_file": "file skipped (not .jpeg, .jpg or .png)",
    "unparseable_name": "file name used as the patient", "label_name_conflict": "folder's label kept",
    "duplicate_id": "kept, its extension added to its id", "broken_symlink": "file skipped",
}


def parse_patient(stem: str) -> tuple[Optional[str], Optional[str]]:
    """(patient_id, detail_class) from a file name without extension; (None, None) if unknown."""
    match = _PERSON.fullmatch(stem)
    if match:
        return f"kaggle-{match.group(1).lower()}", match.group(2).lower()
    match = _IM.fullmatch(stem)
    return (f"kaggle-{match.group(1).upper()}", None) if match else (None, None)


def index(root: Path) -> list[Record]:
    """Every Kaggle image under `root`, ordered by split, folder and file name."""
    root = Path(root).resolve()
    base = next((c for c in (root / "chest_xray", root) if any((c / s).is_dir() for s in SPLITS)), None)
    if base is None:
        raise DatasetLayoutError(f"no Kaggle chest X-ray data under {root}: expected "
                                 "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg")
    problems: dict[str, list[str]] = defaultdict(list)
    records: list[Record] = []
    seen: set[str] = set()
    for split in SPLITS:  # an absent split folder globs to nothing; hidden entries (.DS_Store, ...) are skipped
        for folder in sorted(f for f in (base / split).glob("*") if f.is_dir() and not f.name.startswith(".")):
            label = LABEL_FOLDERS.get(folder.name.upper())
            if label is None:
                problems["unknown_folder"].append(f"{split}/{folder.name}")
                continue
            for entry in sorted(e for e in folder.glob("*") if not e.name.startswith(".")):
                where = f"{split}/{folder.name}/{entry.name}"
                stem, suffix = os.path.splitext(entry.name)
                if entry.is_symlink() and not entry.exists():
                    problems["broken_symlink"].append(where)
                    continue
                if suffix.lower() not in (".jpeg", ".jpg", ".png") or not entry.is_file():
                    problems["skipped_file"].append(where)
                    continue
                patient, detail = parse_patient(stem)
                if patient is None:
                    problems["unparseable_name"].append(where)
                    patient = f"kaggle-{stem}"
                if label == 0 and detail is not None:
                    problems["label_name_conflict"].append(where)
                detail = "normal" if label == 0 else detail
                record_id = f"kaggle/{split}/{folder.name}/{stem}"
                if record_id in seen:  # same stem, another extension
                    problems["duplicate_id"].append(where)
                    record_id = f"kaggle/{split}/{folder.name}/{entry.name}"
                seen.add(record_id)
                records.append(Record(id=record_id, patient_id=patient, source="kaggle", path=str(entry),
                                      label=label, split=split, detail_class=detail))
    if not (base / "test").is_dir():  # e.g. only train/ was unpacked
        logging.getLogger(__name__).warning("kaggle: %s has no test/ folder, the official test split: no Kaggle "
                                            "image is in the test split", base)
    # The official split puts some children in train and test: split_records drops the leak and says so.
    warn_problems(__name__, problems, EFFECTS)
    return records

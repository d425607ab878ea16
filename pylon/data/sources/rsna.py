"""The RSNA Pneumonia Detection Challenge training set: adult DICOMs with pneumonia boxes.

Layout: root/stage_2_train_labels.csv (patientId,x,y,width,height,Target; one row per box, negatives have empty
coordinates), optional root/stage_2_detailed_class_info.csv (patientId,class) and
root/stage_2_train_images/<patientId>.dcm (or .DCM). One Record per image with all its boxes. Indexing opens no image:
``complete`` takes view, age and sex from the DICOM headers the image cache read, and cleans the boxes with its size.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from pylon.data.records import Box, DatasetLayoutError, Record, label_file, warn_problems

MARKER = "stage_2_train_labels.csv"
OFFICIAL_TEST = False
IDS_NAME_FILMS = True  # patientId names a film, not a person: data.patient_maps groups a person's films
# Reported per view too: AP films (mostly bedside, sicker patients) differ from PA ones both in look
# and in how often they show pneumonia, so a merged figure can hide a gap between them.
REPORT_VIEWS = ("AP", "PA")
EXCLUDES: dict[str, str] = {}  # nih declares the clash between the two

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
MAX_PLAUSIBLE_AGE = 120  # the official file has a few ages like 148 and 155: typos

Problems = dict[str, list[str]]
EFFECTS = {  # what indexing does with each kind of problem, said in its warning
    "missing_patient_id": "label row ignored", "bad_target": "label row ignored",
    "incomplete_box": "box ignored", "bad_box_value": "box ignored", "image_without_label": "image not used",
    "conflicting_target": "patient dropped", "missing_image": "patient dropped", "broken_symlink": "patient dropped",
    "implausible_age": "age unknown", "detail_class_conflict": "Target kept",
    "negative_with_box": "boxes ignored, image kept as negative", "non_positive_box_size": "box dropped",
    "box_outside_image": "box dropped", "box_clipped": "box clipped to the image", "duplicate_box": "copy dropped",
    "positive_without_box": "image kept, not scored for localization",
}


def index(root: Path) -> list[Record]:
    """The RSNA training images under `root`, sorted by patientId, with the label file's boxes as they are
    (``complete`` cleans them); malformed rows and images are counted per kind and reported in one warning."""
    root = Path(root).resolve()
    images_dir, details = root / "stage_2_train_images", root / "stage_2_detailed_class_info.csv"
    if not (root / MARKER).is_file():
        raise DatasetLayoutError(f"RSNA label file not found: {root / MARKER}")
    if not images_dir.is_dir():
        raise DatasetLayoutError(f"RSNA image folder not found: {images_dir}")
    problems: Problems = defaultdict(list)
    targets, raw_boxes = read_labels(root / MARKER, problems)
    detail = {}
    if details.is_file():
        reader = csv.DictReader(label_file(details))
        if not {"patientId", "class"} <= set(reader.fieldnames):
            raise DatasetLayoutError(f"{details} lacks column(s) patientId and class")
        detail = {row["patientId"].strip(): row["class"].strip() for row in reader}  # one row per box row
    dicoms = [(stem, e) for e in os.scandir(images_dir) for stem, suffix in [os.path.splitext(e.name)]
              if suffix.lower() == ".dcm"]  # <patientId>.dcm, any case of the extension
    on_disk = {stem: Path(e.path) for stem, e in dicoms if e.is_file()}
    broken = {stem for stem, e in dicoms if not e.is_file() and e.is_symlink()}
    problems["image_without_label"] += sorted(on_disk.keys() - targets.keys())
    records = []
    for patient in sorted(targets):
        if len(targets[patient]) > 1:
            problems["conflicting_target"].append(patient)
            continue
        if patient not in on_disk:
            problems["broken_symlink" if patient in broken else "missing_image"].append(patient)
            continue
        (label,) = targets[patient]
        detail_class = detail.get(patient)
        if detail_class is not None and (detail_class == "Lung Opacity") != (label == 1):
            problems["detail_class_conflict"].append(f"{patient} ({detail_class}, Target {label})")
        records.append(Record(id=patient, patient_id=patient, source="rsna", path=str(on_disk[patient]), label=label,
                              boxes=tuple(Box(*b) for b in raw_boxes.get(patient, [])), detail_class=detail_class))
    warn_problems(__name__, problems, EFFECTS)
    return records


def complete(records: list[Record], headers: list[dict[str, str]], sizes: list[tuple[int, int]]) -> list[Record]:
    """`records` once the image cache has read their files: view, age and sex from each one's DICOM
    header (readers.HEADER_TAGS as text), boxes cleaned and clipped to its (height, width); the
    problems met are reported in one warning."""
    problems: Problems = defaultdict(list)
    done = []
    for record, header, size in zip(records, headers, sizes):
        view, sex = header["ViewPosition"].upper(), header["PatientSex"].upper()
        described = re.search(r"view:\s*(\w+)", header["SeriesDescription"], re.IGNORECASE)
        if not view and described:  # some exports carry the view only in the description, e.g. 'view: PA'
            view = described.group(1).upper()
        age = parse_age(header["PatientAge"])
        if age is not None and age > MAX_PLAUSIBLE_AGE:
            problems["implausible_age"].append(f"{record.id} ({header['PatientAge']})")
            age = None
        done.append(replace(record, boxes=_clean_boxes(record.id, record.label, record.scored_boxes, size, problems),
                            view=view or None, age=age, sex=sex if sex in ("M", "F", "O") else None))
    warn_problems(__name__, problems, EFFECTS)
    return done


def read_labels(path: Path, problems: Optional[Problems] = None
                ) -> tuple[dict[str, set[int]], dict[str, list[tuple[float, float, float, float]]]]:
    """Targets seen per patientId, and the raw (x, y, w, h) of every row with four finite numbers."""
    problems = defaultdict(list) if problems is None else problems
    targets: dict[str, set[int]] = {}
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    reader = csv.DictReader(label_file(path))
    missing = [c for c in LABEL_COLUMNS if c not in reader.fieldnames]
    if missing:
        raise DatasetLayoutError(f"{path} lacks column(s) {missing}; expected {list(LABEL_COLUMNS)}")
    for line, row in enumerate(reader, start=2):
        patient = (row["patientId"] or "").strip()
        if not patient:
            problems["missing_patient_id"].append(f"line {line}")
            continue
        try:
            target = float((row["Target"] or "").strip())
        except ValueError:
            target = math.nan
        if target not in (0.0, 1.0):
            problems["bad_target"].append(f"line {line} ({patient}: {row['Target']!r})")
            continue
        targets.setdefault(patient, set()).add(int(target))
        cells = [(row[c] or "").strip() for c in ("x", "y", "width", "height")]
        if not any(cells):
            continue
        if not all(cells):
            problems["incomplete_box"].append(f"line {line} ({patient})")
            continue
        try:
            values = tuple(float(c) for c in cells)
        except ValueError:
            values = (math.nan,)
        if not all(math.isfinite(v) for v in values):
            problems["bad_box_value"].append(f"line {line} ({patient})")
            continue
        boxes.setdefault(patient, []).append(values)  # type: ignore[arg-type]
    return targets, boxes


def _clean_boxes(patient: str, label: int, raw: Sequence, size: tuple[int, int], problems: Problems) -> tuple[Box, ...]:
    """Positive images' boxes: empty ones dropped, clipped to the image, duplicates dropped."""
    if label == 0:
        if raw:
            problems["negative_with_box"].append(patient)
        return ()
    rows, columns = size
    kept: list[Box] = []
    for x, y, w, h in raw:
        where = f"{patient} ({x:g}, {y:g}, {w:g}, {h:g})"
        if w <= 0 or h <= 0:
            problems["non_positive_box_size"].append(where)
            continue
        box = Box(x, y, w, h)
        if x < 0 or y < 0 or x + w > columns or y + h > rows:
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(columns)), min(y + h, float(rows))
            if x1 <= x0 or y1 <= y0:
                problems["box_outside_image"].append(where)
                continue
            box = Box(x0, y0, x1 - x0, y1 - y0)
            problems["box_clipped"].append(where)
        if box in kept:
            problems["duplicate_box"].append(where)
            continue
        kept.append(box)
    if not kept:
        problems["positive_without_box"].append(patient)
    return tuple(kept)


def parse_age(text: Optional[str]) -> Optional[int]:
    """Whole years from a DICOM Age String ('045Y', '006M', '010W', '003D') or a bare '58'."""
    match = re.fullmatch(r"\s*(\d+)\s*([YMWD]?)\s*", str(text), re.IGNORECASE) if text is not None else None
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper() or "Y"
    return int(number * {"Y": 365.25, "M": 365.25 / 12, "W": 7, "D": 1}[unit] // 365.25)

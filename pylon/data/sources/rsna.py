"""The RSNA Pneumonia Detection Challenge training set: adult DICOMs with pneumonia boxes.

Layout: root/stage_2_train_labels.csv (patientId,x,y,width,height,Target; one row per box,
negatives have empty coordinates), optional root/stage_2_detailed_class_info.csv
(patientId,class) and root/stage_2_train_images/<patientId>.dcm (or .DCM). One Record per
image with all its boxes; view, age and sex come from the DICOM headers, read without pixels and kept in
<cache_dir>/rsna_headers.csv keyed by file name, size and mtime (26,684 headers take minutes).
"""
from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import pydicom
from tqdm import tqdm

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
    "unreadable_header": "patient dropped", "implausible_age": "age unknown", "detail_class_conflict": "Target kept",
    "negative_with_box": "boxes ignored, image kept as negative", "non_positive_box_size": "box dropped",
    "box_outside_image": "box dropped", "box_clipped": "box clipped to the image", "duplicate_box": "copy dropped",
    "positive_without_box": "image kept, not scored for localization",
}


class Header(NamedTuple):
    view: Optional[str]
    age: Optional[str]  # the raw Age String, parsed by parse_age
    sex: Optional[str]
    rows: Optional[str]
    columns: Optional[str]


def index(root: Path, cache_dir: Optional[Path] = None) -> list[Record]:
    """The RSNA training images under `root`, sorted by patientId; malformed rows, boxes and
    images are counted per kind and reported in one warning."""
    root = Path(root).resolve()
    images_dir = root / "stage_2_train_images"
    if not (root / MARKER).is_file():
        raise DatasetLayoutError(f"RSNA label file not found: {root / MARKER}")
    if not images_dir.is_dir():
        raise DatasetLayoutError(f"RSNA image folder not found: {images_dir}")
    problems: Problems = defaultdict(list)
    targets, raw_boxes = read_labels(root / MARKER, problems)
    detail = _read_detail_classes(root / "stage_2_detailed_class_info.csv")
    on_disk, broken = _dicom_files(images_dir)
    problems["image_without_label"] += sorted(on_disk.keys() - targets.keys())
    present = []
    for patient in sorted(targets):
        if len(targets[patient]) > 1:
            problems["conflicting_target"].append(patient)
        elif patient not in on_disk:
            problems["broken_symlink" if patient in broken else "missing_image"].append(patient)
        else:
            present.append(patient)

    paths = [on_disk[patient] for patient in present]
    headers = read_headers(paths, None if cache_dir is None else Path(cache_dir) / "rsna_headers.csv")
    records = []
    for patient, path in zip(present, paths):
        header = headers[path.name]
        if header is None:
            problems["unreadable_header"].append(patient)
            continue
        (label,) = targets[patient]
        size = (int(header.rows or 1024), int(header.columns or 1024))  # every challenge image is 1024 x 1024
        boxes = _clean_boxes(patient, label, raw_boxes.get(patient, []), size, problems)
        age = parse_age(header.age)
        if age is not None and age > MAX_PLAUSIBLE_AGE:
            problems["implausible_age"].append(f"{patient} ({header.age})")
            age = None
        detail_class = detail.get(patient)
        if detail_class is not None and (detail_class == "Lung Opacity") != (label == 1):
            problems["detail_class_conflict"].append(f"{patient} ({detail_class}, Target {label})")
        records.append(Record(id=patient, patient_id=patient, source="rsna", path=str(path), label=label,
                              boxes=boxes, view=header.view, age=age, sex=header.sex, detail_class=detail_class))
    warn_problems(__name__, problems, EFFECTS)
    return records


def _dicom_files(folder: Path) -> tuple[dict[str, Path], set[str]]:
    """patientId -> file of every <patientId>.dcm (any case of the extension), and the ids whose
    file is a broken symbolic link."""
    files, broken = {}, set()
    for entry in os.scandir(folder):
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() != ".dcm":
            continue
        if entry.is_file():
            files[stem] = Path(entry.path)
        elif entry.is_symlink():
            broken.add(stem)
    return files, broken


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


def _read_detail_classes(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    reader = csv.DictReader(label_file(path))
    if not {"patientId", "class"} <= set(reader.fieldnames):
        raise DatasetLayoutError(f"{path} lacks column(s) patientId and class")
    return {row["patientId"].strip(): row["class"].strip() for row in reader}  # one row per box row


def _clean_boxes(patient: str, label: int, raw: list, size: tuple[int, int], problems: Problems) -> tuple[Box, ...]:
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


_HEADER_TAGS = ["ViewPosition", "PatientAge", "PatientSex", "Rows", "Columns", "SeriesDescription"]


def read_headers(paths: list[Path], cache: Optional[Path] = None) -> dict[str, Optional[Header]]:
    """Header per file name (None where unreadable), reusing the CSV `cache` for unchanged files."""
    stamps = {p.name: (s.st_size, s.st_mtime_ns) for p in paths for s in [p.stat()]}
    known = {}
    if cache is not None and cache.is_file():
        with open(cache, newline="", encoding="utf-8") as handle:
            known = {row["file"]: ((int(row["size"]), int(row["mtime_ns"])),
                                   Header(*(row[f] or None for f in Header._fields))) for row in csv.DictReader(handle)}
    result = {p.name: known[p.name][1] for p in paths if p.name in known and known[p.name][0] == stamps[p.name]}
    to_read = [p for p in paths if p.name not in result]
    if to_read:
        with ThreadPoolExecutor(max_workers=8) as pool:  # light parsing: threads overlap file-open latency
            headers = tqdm(pool.map(read_header, to_read), total=len(to_read), disable=len(to_read) < 500,
                           desc="reading RSNA DICOM headers")
            result.update(zip([p.name for p in to_read], headers))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            with open(partial, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["file", "size", "mtime_ns", *Header._fields])
                writer.writerows([name, *stamps[name], *(v or "" for v in header)]  # unreadable: retried next time
                                 for name, header in sorted(result.items()) if header)
            os.replace(partial, cache)
    return result


def read_header(path: Path) -> Optional[Header]:
    """The indexing fields of one DICOM file, or None when its header cannot be parsed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bare RSNA ages ('58') trigger validation warnings
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            view, age, sex, rows, columns, description = (str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS)
    except Exception:  # corrupt files raise many different types
        return None
    if not view:  # some exports carry the view only in the description, e.g. 'view: PA'
        match = re.search(r"view:\s*(\w+)", description, re.IGNORECASE)
        view = match.group(1) if match else ""
    sex = sex.upper() if sex.upper() in ("M", "F", "O") else ""
    return Header(*(v or None for v in (view.upper(), age, sex, rows, columns)))


def parse_age(text: Optional[str]) -> Optional[int]:
    """Whole years from a DICOM Age String ('045Y', '006M', '010W', '003D') or a bare '58'."""
    match = re.fullmatch(r"\s*(\d+)\s*([YMWD]?)\s*", str(text), re.IGNORECASE) if text is not None else None
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper() or "Y"
    return int(number * {"Y": 365.25, "M": 365.25 / 12, "W": 7, "D": 1}[unit] // 365.25)

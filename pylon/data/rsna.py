"""Index the RSNA Pneumonia Detection Challenge training set into Records.

Layout (as published): root/stage_2_train_labels.csv (patientId,x,y,width,height,Target; one
row per box, negatives have empty coordinates), optional
root/stage_2_detailed_class_info.csv (patientId,class) and
root/stage_2_train_images/<patientId>.dcm. One Record per image, holding all its boxes; view,
age and sex come from the DICOM headers (read without pixels, optionally cached).

Malformed label rows are never kept silently: each kind is counted in an IndexReport,
logged as a warning, and handled by the policy in RSNA_POLICY.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pydicom
from tqdm import tqdm

from .readers import DatasetLayoutError
from .records import Box, Record
from .report import IndexReport

logger = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
DEFAULT_IMAGE_SIZE = (1024, 1024)  # (rows, columns) of every challenge image
MAX_PLAUSIBLE_AGE = 120  # the official file has a few ages like 148 and 155: typos

RSNA_POLICY = {
    # per label row
    "missing_patient_id": "row dropped",
    "bad_target": "row dropped (Target must be 0 or 1)",
    "incomplete_box": "box dropped (some of x, y, width, height empty)",
    "bad_box_value": "box dropped (coordinate not a finite number)",
    # per box
    "non_positive_box_size": "box dropped (width or height <= 0)",
    "box_outside_image": "box dropped (no overlap with the image)",
    "box_clipped": "box clipped to the image bounds",
    "duplicate_box": "repeated box dropped",
    # per image
    "negative_with_box": "image kept as negative, its boxes dropped",
    "positive_without_box": "image kept as positive with no boxes (not used for localization)",
    "conflicting_target": "image dropped (rows disagree on Target)",
    "missing_image": "image dropped (no DICOM file)",
    "unreadable_header": "image dropped (DICOM header unreadable)",
    "implausible_age": f"age set to None (over {MAX_PLAUSIBLE_AGE} years)",
    "detail_class_conflict": "kept; detailed class disagrees with Target",
    "image_without_label": "ignored; DICOM file has no label row",
}


@dataclass(frozen=True)
class DicomHeader:
    """The few header fields indexing needs."""

    view: Optional[str]
    age: Optional[str]  # raw Age String, parsed by parse_age
    sex: Optional[str]
    rows: Optional[int]
    columns: Optional[int]


def index_rsna(
    root: Union[str, Path],
    *,
    header_cache: Optional[Union[str, Path]] = None,
    workers: Optional[int] = None,
) -> list[Record]:
    """Records of the RSNA training images under `root`, sorted by patientId.

    header_cache: a CSV file where header fields are kept between calls, keyed by file name,
    size and mtime (a changed file is read again). None reads every header each time.
    Problems in the label file are logged; use index_rsna_with_report to get them as data.
    """
    records, _ = index_rsna_with_report(root, header_cache=header_cache, workers=workers)
    return records


def index_rsna_with_report(
    root: Union[str, Path],
    *,
    header_cache: Optional[Union[str, Path]] = None,
    workers: Optional[int] = None,
) -> tuple[list[Record], IndexReport]:
    """index_rsna, also returning the IndexReport of every malformed row, box or image."""
    root = Path(root).resolve()
    labels_path = root / LABELS_CSV
    images_dir = root / IMAGES_DIR
    if not labels_path.is_file():
        raise DatasetLayoutError(f"RSNA label file not found: {labels_path}")
    if not images_dir.is_dir():
        raise DatasetLayoutError(f"RSNA image folder not found: {images_dir}")

    report = IndexReport(source="rsna", policy=dict(RSNA_POLICY))
    targets, raw_boxes = _read_label_rows(labels_path, report)
    detail = _read_detail_classes(root / CLASS_CSV)
    on_disk = {
        entry.name[: -len(".dcm")]
        for entry in os.scandir(images_dir)
        if entry.name.endswith(".dcm") and entry.is_file()
    }
    for patient in sorted(on_disk - targets.keys()):
        report.add("image_without_label", patient)

    present = []
    for patient in sorted(targets):
        if len(targets[patient]) > 1:
            report.add("conflicting_target", patient)
        elif patient not in on_disk:
            report.add("missing_image", patient)
        else:
            present.append(patient)

    paths = [images_dir / f"{patient}.dcm" for patient in present]
    headers = read_headers(paths, cache=header_cache, workers=workers)

    records = []
    for patient, path in zip(present, paths):
        header = headers[path.name]
        if header is None:
            report.add("unreadable_header", patient)
            continue
        label = next(iter(targets[patient]))
        image_size = (header.rows or DEFAULT_IMAGE_SIZE[0], header.columns or DEFAULT_IMAGE_SIZE[1])
        boxes = _clean_boxes(patient, label, raw_boxes.get(patient, []), image_size, report)
        age = parse_age(header.age)
        if age is not None and age > MAX_PLAUSIBLE_AGE:
            report.add("implausible_age", f"{patient} ({header.age})")
            age = None
        detail_class = detail.get(patient)
        if detail_class is not None and (detail_class == "Lung Opacity") != (label == 1):
            report.add("detail_class_conflict", f"{patient} ({detail_class}, Target {label})")
        records.append(
            Record(
                id=patient,
                patient_id=patient,
                source="rsna",
                path=str(path),
                label=label,
                boxes=boxes,
                view=header.view,
                age=age,
                sex=header.sex,
                detail_class=detail_class,
            )
        )
    report.n_images = len(records)
    report.n_positive = sum(r.label for r in records)
    report.n_boxes = sum(len(r.boxes) for r in records)
    report.log(logger)
    return records, report


# ---------------------------------------------------------------- label file


def _read_label_rows(
    labels_path: Path, report: IndexReport
) -> tuple[dict[str, set[int]], dict[str, list[tuple[float, ...]]]]:
    """Targets seen per patient and the raw (x, y, w, h) of every row that has all four."""
    targets: dict[str, set[int]] = {}
    boxes: dict[str, list[tuple[float, ...]]] = {}
    with open(labels_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayoutError(
                f"{labels_path} lacks column(s) {missing}; expected {list(LABEL_COLUMNS)}"
            )
        for line, row in enumerate(reader, start=2):
            where = f"line {line}"
            patient = (row["patientId"] or "").strip()
            if not patient:
                report.add("missing_patient_id", where)
                continue
            target = _parse_target(row["Target"])
            if target is None:
                report.add("bad_target", f"{where} ({patient}: {row['Target']!r})")
                continue
            targets.setdefault(patient, set()).add(target)
            cells = [(row[c] or "").strip() for c in ("x", "y", "width", "height")]
            if not any(cells):
                continue
            if not all(cells):
                report.add("incomplete_box", f"{where} ({patient})")
                continue
            try:
                values = tuple(float(c) for c in cells)
            except ValueError:
                values = (math.nan,)
            if not all(math.isfinite(v) for v in values):
                report.add("bad_box_value", f"{where} ({patient})")
                continue
            boxes.setdefault(patient, []).append(values)
    return targets, boxes


def _parse_target(text: Optional[str]) -> Optional[int]:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def _read_detail_classes(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"patientId", "class"} <= set(reader.fieldnames or []):
            raise DatasetLayoutError(f"{path} lacks column(s) patientId and class")
        # the file repeats a patient once per box row, always with the same class
        return {row["patientId"].strip(): row["class"].strip() for row in reader}


def _clean_boxes(
    patient: str,
    label: int,
    raw: list[tuple[float, ...]],
    image_size: tuple[int, int],
    report: IndexReport,
) -> tuple[Box, ...]:
    if label == 0:
        if raw:
            report.add("negative_with_box", patient)
        return ()
    rows, columns = image_size
    kept: list[Box] = []
    for x, y, w, h in raw:
        where = f"{patient} ({x:g}, {y:g}, {w:g}, {h:g})"
        if w <= 0 or h <= 0:
            report.add("non_positive_box_size", where)
            continue
        box: Box = (x, y, w, h)
        if x < 0 or y < 0 or x + w > columns or y + h > rows:
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(columns)), min(y + h, float(rows))
            if x1 <= x0 or y1 <= y0:
                report.add("box_outside_image", where)
                continue
            box = (x0, y0, x1 - x0, y1 - y0)
            report.add("box_clipped", where)
        if box in kept:
            report.add("duplicate_box", where)
            continue
        kept.append(box)
    if not kept:
        report.add("positive_without_box", patient)
    return tuple(kept)


# ---------------------------------------------------------------- DICOM headers

_HEADER_TAGS = ["ViewPosition", "SeriesDescription", "PatientAge", "PatientSex", "Rows", "Columns"]
_CACHE_COLUMNS = ("file", "size", "mtime_ns", "view", "age", "sex", "rows", "columns")


def read_headers(
    paths: list[Path],
    *,
    cache: Optional[Union[str, Path]] = None,
    workers: Optional[int] = None,
) -> dict[str, Optional[DicomHeader]]:
    """DicomHeader per file name (None where unreadable), reusing a CSV cache when given."""
    stats = {}
    for path in paths:
        try:
            stat = path.stat()
            stats[path.name] = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stats[path.name] = None
    cached = _load_header_cache(Path(cache)) if cache is not None else {}
    result: dict[str, Optional[DicomHeader]] = {}
    to_read = []
    for path in paths:
        hit = cached.get(path.name)
        if hit is not None and stats[path.name] is not None and hit[0] == stats[path.name]:
            result[path.name] = hit[1]
        else:
            to_read.append(path)

    if to_read:
        workers = workers or min(8, 2 * (os.cpu_count() or 1))
        progress = dict(desc="reading RSNA DICOM headers", total=len(to_read), disable=len(to_read) < 500)
        if workers > 1 and len(to_read) > 64:
            # Header parsing is light; the threads mostly overlap file-open latency.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                headers = list(tqdm(pool.map(read_header, to_read, chunksize=32), **progress))
        else:
            headers = [read_header(path) for path in tqdm(to_read, **progress)]
        result.update({path.name: header for path, header in zip(to_read, headers)})
        if cache is not None:
            _save_header_cache(Path(cache), result, stats)
    return result


def read_header(path: Path) -> Optional[DicomHeader]:
    """The indexing fields of one DICOM file, or None when its header cannot be parsed."""
    try:
        with warnings.catch_warnings():
            # values like the RSNA's bare ages ('58') trigger validation warnings: harmless
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            view = str(ds.get("ViewPosition", "") or "").strip().upper()
            description = str(ds.get("SeriesDescription", "") or "")
            age = str(ds.get("PatientAge", "") or "").strip()
            sex = str(ds.get("PatientSex", "") or "").strip().upper()
            rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    except Exception as error:  # corrupt files raise many different types
        logger.debug("cannot read DICOM header of %s: %s", path, error)
        return None
    if not view:
        # some exports carry the view only in the description, e.g. 'view: PA'
        match = re.search(r"view:\s*(\w+)", description, re.IGNORECASE)
        view = match.group(1).upper() if match else ""
    return DicomHeader(
        view=view or None,
        age=age or None,
        sex=sex if sex in ("M", "F", "O") else None,
        rows=rows,
        columns=columns,
    )


def parse_age(text: Optional[str]) -> Optional[int]:
    """Whole years from a DICOM Age String ('045Y', '006M', '010W', '003D') or a bare '58'."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*([YMWD]?)\s*", str(text), re.IGNORECASE)
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper() or "Y"
    days_per_unit = {"Y": None, "M": 365.25 / 12, "W": 7, "D": 1}[unit]
    return number if days_per_unit is None else int(number * days_per_unit // 365.25)


def _int_or_none(value: object) -> Optional[int]:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _load_header_cache(path: Path) -> dict[str, tuple[tuple[int, int], DicomHeader]]:
    if not path.is_file():
        return {}
    entries = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                entries[row["file"]] = (
                    (int(row["size"]), int(row["mtime_ns"])),
                    DicomHeader(
                        view=row["view"] or None,
                        age=row["age"] or None,
                        sex=row["sex"] or None,
                        rows=_int_or_none(row["rows"]),
                        columns=_int_or_none(row["columns"]),
                    ),
                )
    except (KeyError, ValueError, csv.Error) as error:
        logger.warning("ignoring unreadable header cache %s (%s); rebuilding it", path, error)
        return {}
    return entries


def _save_header_cache(
    path: Path,
    headers: dict[str, Optional[DicomHeader]],
    stats: dict[str, Optional[tuple[int, int]]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # write then rename, so a crash never leaves a half-written cache behind
    handle = tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False, newline="", encoding="utf-8"
    )
    with handle:
        writer = csv.writer(handle)
        writer.writerow(_CACHE_COLUMNS)
        for name in sorted(headers):
            header, stat = headers[name], stats.get(name)
            if header is None or stat is None:
                continue  # unreadable files are retried next time
            writer.writerow(
                [name, stat[0], stat[1], header.view or "", header.age or "", header.sex or "",
                 header.rows or "", header.columns or ""]
            )
    os.replace(handle.name, path)

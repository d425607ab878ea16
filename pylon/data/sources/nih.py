"""NIH ChestX-ray14: adult PNGs with 14 finding labels, and boxes for a few of them.

Layout: root/Data_Entry_2017.csv (Image Index, Finding Labels as 'Pneumonia|Effusion' or 'No Finding', Patient ID,
Patient Age, Patient Gender, View Position, ...), root/BBox_List_2017.csv (Image Index, Finding Label, then x, y, w, h
in the 3rd to 6th columns, of which only the 3rd is named) and the PNGs in root/images*/ or root/images*/images/ (as
the download unpacks). label = 1 when Pneumonia is among the findings. Every box is kept with its finding
lower-cased; only pneumonia boxes are scored.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from pylon.data.records import SCORED_FINDING, Box, DatasetLayoutError, Record, label_file, warn_problems
from pylon.data.sources.rsna import MAX_PLAUSIBLE_AGE, parse_age

MARKER = "BBox_List_2017.csv"
OFFICIAL_TEST = False
IDS_NAME_FILMS = False  # its patient ids name people
REPORT_VIEWS = ()  # its records keep View Position, but reports break views down for RSNA alone
EXCLUDES = {"rsna": "rsna's films are NIH ChestX-ray14 films relabelled under new ids, so the two together "
                    "would put the same film in different splits"}

ENTRIES = "Data_Entry_2017.csv"
EFFECTS = {  # what indexing does with each kind of problem, said in its warning
    "bad_box": "box ignored", "missing_image": "row dropped", "negative_with_pneumonia_box": "box dropped",
    "implausible_age": "age unknown", "box_without_image": "box ignored",
}
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")


def index(root: Path) -> list[Record]:
    """Every image listed in Data_Entry_2017.csv that is on disk, in the file's order."""
    root = Path(root).resolve()
    if not (root / ENTRIES).is_file():
        raise DatasetLayoutError(f"NIH image list not found: {root / ENTRIES}")
    files = {p.name: p for pattern in ("images*/*.png", "images*/images/*.png") for p in root.glob(pattern)}
    problems: dict[str, list[str]] = defaultdict(list)
    boxes: dict[str, list[Box]] = defaultdict(list)
    rows = csv.reader(label_file(root / MARKER))
    next(rows, None)  # the header names only the first of the four coordinate columns
    for line, row in enumerate(rows, start=2):
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:  # not a number, or fewer than four
            x = y = w = h = math.nan
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            problems["bad_box"].append(f"line {line}")
            continue
        boxes[row[0].strip()].append(Box(x, y, w, h, row[1].strip().lower()))

    records = []
    reader = csv.DictReader(label_file(root / ENTRIES))
    missing = [c for c in ENTRY_COLUMNS if c not in reader.fieldnames]
    if missing:
        raise DatasetLayoutError(f"{root / ENTRIES} lacks column(s) {missing}")
    for row in reader:
        name = row["Image Index"].strip()
        if name not in files:
            problems["missing_image"].append(name)
            continue
        label = int("Pneumonia" in [f.strip() for f in row["Finding Labels"].split("|")])
        image_boxes = tuple(boxes.pop(name, ()))
        if not label and any(b.finding == SCORED_FINDING for b in image_boxes):
            problems["negative_with_pneumonia_box"].append(name)  # dropped: nothing to find there
            image_boxes = tuple(b for b in image_boxes if b.finding != SCORED_FINDING)
        age = parse_age(row["Patient Age"])
        if age is not None and age > MAX_PLAUSIBLE_AGE:
            problems["implausible_age"].append(f"{name} ({age})")
            age = None
        sex = row["Patient Gender"].strip().upper()
        records.append(Record(id=f"nih/{Path(name).stem}", patient_id=f"nih-{row['Patient ID'].strip()}",
                              source="nih", path=str(files[name]), label=label, boxes=image_boxes,
                              view=row["View Position"].strip().upper() or None, age=age,
                              sex=sex if sex in ("M", "F") else None, detail_class=row["Finding Labels"].strip()))
    problems["box_without_image"] += sorted(boxes)
    warn_problems(__name__, problems, EFFECTS)
    return records

"""The unit every data-handling step passes along: one image and what is known of it."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

from pylon import PylonError

log = logging.getLogger(__name__)
SCORED_FINDING = "pneumonia"  # the only finding whose boxes heatmaps are scored against


class Box(NamedTuple):
    """(x, y, w, h) in pixels of the image the box belongs to, and what it marks."""

    x: float
    y: float
    w: float
    h: float
    finding: str = SCORED_FINDING


@dataclass(frozen=True)
class Record:
    id: str
    patient_id: str
    source: str  # a name in pylon.data.sources.SOURCES
    path: str
    label: int
    boxes: tuple[Box, ...] = ()
    split: Optional[str] = None  # "train", "val", "test" or "all"
    view: Optional[str] = None
    age: Optional[int] = None
    sex: Optional[str] = None
    detail_class: Optional[str] = None

    @property
    def scored_boxes(self) -> tuple[tuple[float, float, float, float], ...]:
        """(x, y, w, h) of the boxes localization is scored on (finding SCORED_FINDING)."""
        return tuple(tuple(b[:4]) for b in self.boxes if b.finding == SCORED_FINDING)


class DatasetLayoutError(PylonError, ValueError):
    """A data set folder or label file that does not have the expected layout."""


def label_file(path: Path) -> io.StringIO:
    """A label CSV's text, for the csv module; DatasetLayoutError naming the file unless it is UTF-8 text with
    rows below its header."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetLayoutError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#x} at offset "
                                 f"{error.start}); save it as UTF-8") from None
    if len(text.strip().splitlines()) < 2:
        raise DatasetLayoutError(f"{path} is empty: no rows below a header")
    return io.StringIO(text, newline="")


def warn_problems(module: str, problems: dict[str, list[str]], effects: Mapping[str, str]) -> None:
    """One warning from a source module's logger: each kind of problem met, its count, a few examples and, from
    ``effects`` (kind -> what indexing did about it), what became of them."""
    kinds = "; ".join(f"{kind}: {len(examples)} (e.g. {', '.join(examples[:3])})"
                      + (f" -> {effects[kind]}" if kind in effects else "")
                      for kind, examples in sorted(problems.items()) if examples)
    if kinds:
        logging.getLogger(module).warning("%s: problems found while indexing: %s", module.rsplit(".", 1)[-1], kinds)


def with_patient_map(records: Sequence[Record], path: Path, key: str) -> list[Record]:
    """``records`` with ``patient_id`` read from the CSV at ``path``: its first column is the image id, its column
    ``patient`` (or ``*_patient``) the person; images missing from it, or with an empty cell, stay their own
    patient. One line says how many people the films came from."""
    if not Path(path).is_file():
        raise DatasetLayoutError(f"{key}: no such file {path} (a relative path is taken from the source's root); "
                                 f"give the CSV's path, or group by image id alone with --set {key.rsplit('.', 1)[0]}={{}}")
    reader = csv.reader(label_file(path))
    header = next(reader)
    column = next((i for i, name in enumerate(header) if name == "patient" or name.endswith("_patient")), None)
    if column is None or column == 0:
        raise DatasetLayoutError(f"{key}: {path} needs the image id in its first column and a column named "
                                 f"patient or *_patient; its columns are {header}")
    person = {row[0].strip(): row[column].strip() for row in reader if len(row) > column and row[column].strip()}
    mapped = [replace(r, patient_id=f"{r.source}-person-{person[r.id]}") if r.id in person else r for r in records]
    log.info("%s: %d images belong to %d people (%d images not in the map count as their own person)", key,
             len(mapped), len({r.patient_id for r in mapped}), sum(r.id not in person for r in mapped))
    return mapped

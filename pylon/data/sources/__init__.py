"""The data sources: one module each, registered in SOURCES by the name configs use. What a source module
declares (MARKER, OFFICIAL_TEST, IDS_NAME_FILMS, REPORT_VIEWS, EXCLUDES, ``index`` and optionally ``complete``) is
the "A data source" recipe of docs/ARCHITECTURE.md. Importing this package loads neither torch nor OpenCV.
"""
from __future__ import annotations

from collections.abc import Sequence

from pylon.data.records import Record
from pylon.data.sources import kaggle, nih, rsna

SOURCES = {"kaggle": kaggle, "rsna": rsna, "nih": nih}


def complete_records(records: Sequence[Record], headers: Sequence[dict[str, str]],
                     sizes: Sequence[tuple[int, int]]) -> list[Record]:
    """An image cache's rows as their sources complete them: each source's ``complete``, where it has one, gets its
    own rows' records, DICOM header fields (readers.HEADER_TAGS) and (height, width)."""
    done = list(records)
    for name, module in SOURCES.items():
        rows = [i for i, r in enumerate(records) if r.source == name]
        if rows and hasattr(module, "complete"):
            own = ([column[i] for i in rows] for column in (records, headers, sizes))
            for i, record in zip(rows, module.complete(*own)):
                done[i] = record
    return done


def report_group(record: Record) -> str:
    """The view ``record`` is also reported under (metrics.json's ``by_view``, the tables, the shortcut probe), or
    "" where its source declares no REPORT_VIEWS: so its views never pool with another source's."""
    return (record.view or "") if SOURCES[record.source].REPORT_VIEWS else ""


def reported_views() -> dict[str, tuple[str, ...]]:
    """Source name -> the views it declares in REPORT_VIEWS, for the sources that declare any."""
    return {name: tuple(module.REPORT_VIEWS) for name, module in SOURCES.items() if module.REPORT_VIEWS}


def exclusions(names: Sequence[str]) -> list[str]:
    """Why the sources ``names`` cannot be used together: what each declares in EXCLUDES about another."""
    return [why for name in names for other, why in SOURCES[name].EXCLUDES.items() if other in names]

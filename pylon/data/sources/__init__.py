"""The data sources: one module each, registered in SOURCES by the name configs use.

A source module exposes MARKER (a path under its root, ``data.roots.<name>``, that must exist),
OFFICIAL_TEST (True when it ships its own test split, which the splitter then keeps; otherwise
``data.test_fraction`` of its patients are held out), IDS_NAME_FILMS (True when its patient ids
name films rather than people, so that a run without ``data.patient_maps`` says so) and
``index(root: Path, cache_dir: Optional[Path]) -> list[Record]``. Adding a source is one
module plus one line here. Importing this package loads neither torch nor OpenCV.
"""
from __future__ import annotations

from pylon.data.sources import kaggle, nih, rsna

SOURCES = {"kaggle": kaggle, "rsna": rsna, "nih": nih}

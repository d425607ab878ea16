"""The data sources: one module each, registered in SOURCES by the name configs use.

A source module exposes MARKER (a path under its root that must exist), OFFICIAL_TEST (True
when it ships its own test split, which the splitter then keeps), IDS_NAME_FILMS (True when
its patient ids name films rather than people, so that a run without ``data.patient_maps``
says so) and
``index(root: Path, cache_dir: Optional[Path]) -> list[Record]``. Adding a source is one
module plus one line here. Importing this package loads neither torch nor OpenCV.
"""
from __future__ import annotations

from typing import Any, Optional

from pylon.data.sources import kaggle, nih, rsna

SOURCES = {"kaggle": kaggle, "rsna": rsna, "nih": nih}


def source_root(data_cfg: Any, name: str) -> Optional[str]:
    """The configured root of source `name`: ``data.roots[name]``, else ``data.<name>_root``."""
    return data_cfg.roots[name] if name in data_cfg.roots else data_cfg.get(f"{name}_root")


def root_key(data_cfg: Any, name: str) -> str:
    """The config key that holds source `name`'s root, for messages."""
    return f"roots.{name}" if name in data_cfg.roots else f"{name}_root"

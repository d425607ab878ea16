"""The unit every data-handling step passes along: one image and what is known of it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

Box = tuple[float, float, float, float]
"""(x, y, w, h) in pixels of the image the box belongs to."""

Source = Literal["kaggle", "rsna"]
Split = Literal["train", "val", "test", "all"]


@dataclass(frozen=True)
class Record:
    id: str
    patient_id: str
    source: Source
    path: str
    label: int
    boxes: tuple[Box, ...] = ()
    split: Optional[Split] = None
    view: Optional[str] = None
    age: Optional[int] = None
    sex: Optional[str] = None
    detail_class: Optional[str] = None

    def with_split(self, split: Optional[Split]) -> "Record":
        return replace(self, split=split)

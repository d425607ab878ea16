"""What an indexer found wrong with a data set, counted per kind, and what it did about it."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

MAX_EXAMPLES = 5


@dataclass
class IndexReport:
    """Counts of every problem an indexer met; `policy` says what was done for each kind."""

    source: str
    n_images: int = 0
    n_positive: int = 0
    n_boxes: int = 0
    issues: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    policy: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, example: str, count: int = 1) -> None:
        if kind not in self.policy:
            raise KeyError(f"issue kind {kind!r} has no documented policy")
        self.issues[kind] += count
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.n_images} images, {self.n_positive} positive, {self.n_boxes} boxes"
        ]
        for kind, count in sorted(self.issues.items()):
            examples = ", ".join(self.examples.get(kind, []))
            lines.append(f"  {kind}: {count} ({self.policy[kind]}); e.g. {examples}")
        return "\n".join(lines)

    def log(self, logger: logging.Logger) -> None:
        """One warning listing every issue kind, or an info line when the data were clean."""
        if self.issues:
            logger.warning("problems found while indexing\n%s", self.summary())
        else:
            logger.info("%s", self.summary())

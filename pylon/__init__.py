"""pylon-cxr: PYLON and baseline chest X-ray classifiers whose heatmaps are scored against boxes."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PylonConfig", "BaselineConfig", "PylonError", "__version__"]


class PylonError(Exception):
    """An error whose one-line message says all a user needs (a bad config, flag, file, data layout
    or checkpoint, a diverged training): the scripts print it without a traceback and exit with 2."""


def __getattr__(name: str) -> Any:
    # Lazy, so that `python train.py --config typo.yaml` fails before torch is imported.
    if name in ("PylonConfig", "BaselineConfig"):
        from pylon import models

        return getattr(models, name)
    raise AttributeError(f"module 'pylon' has no attribute {name!r}")

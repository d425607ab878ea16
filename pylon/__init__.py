"""pylon-cxr: PYLON and baseline chest X-ray classifiers whose heatmaps are scored against boxes."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ConfigError", "PylonError", "__version__"]


class PylonError(Exception):
    """An error whose one-line message says all a user needs (a bad config, flag, file, data layout
    or checkpoint, a diverged training): the scripts print it without a traceback and exit with 2."""


class ConfigError(PylonError, ValueError):
    """A user mistake in a config file, override or data layout (``pylon.config`` re-exports it)."""

"""Shared fixtures: where the real data samples live, and synthetic radiograph-like pixels."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


def realdata_root() -> Path:
    """The real data samples: $PYLON_REALDATA, else ../shared/realdata beside the repository."""
    override = os.environ.get("PYLON_REALDATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    root = realdata_root()
    if not root.is_dir():
        pytest.skip(f"real data samples not present at {root}")
    return root


@pytest.fixture(scope="session")
def rsna_sample(realdata: Path) -> Path:
    root = realdata / "rsna_sample"
    if not root.is_dir():
        pytest.skip(f"RSNA sample not present at {root}")
    return root


@pytest.fixture(scope="session")
def kermany(realdata: Path) -> Path:
    root = realdata / "kermany_224"
    if not root.is_dir():
        pytest.skip(f"Kaggle (Kermany) sample not present at {root}")
    return root


def make_phantom(height: int = 48, width: int = 64, max_value: int = 255, dtype=np.uint8) -> np.ndarray:
    """A smooth chest-like test image (two dark lungs in a bright body) spanning 0..max_value.

    Smooth so that JPEG error stays small, with exact 0 and max_value pixels so that range
    scaling is fully exercised.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    body = 0.6 + 0.4 * np.sin(np.pi * yy / (height - 1))
    lungs = np.zeros_like(body)
    for centre_x in (0.3 * width, 0.7 * width):
        lungs += np.exp(-(((xx - centre_x) / (0.15 * width)) ** 2 + ((yy - 0.5 * height) / (0.3 * height)) ** 2))
    image = np.clip(body - 0.5 * lungs, 0, None)
    image = (image - image.min()) / (image.max() - image.min())
    return np.rint(image * max_value).astype(dtype)


@pytest.fixture
def phantom() -> Callable[..., np.ndarray]:
    return make_phantom

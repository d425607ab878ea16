"""Augmentation and normalization (albumentations), with boxes moving alongside the image.

The training recipe is the reference implementation's: rotate (up to +-90 degrees, half
the time, black border), random resized crop (area 0.7-1, aspect 3/4-4/3) back to S x S,
horizontal flip (half the time), brightness/contrast (+-0.5, half the time), all resampling
cubic; then grey values are normalized as (x / 255 - mean) / std with the reference
statistics mean 0.4984, std 0.2483, and returned as a float tensor (1, S, S).

Boxes are (x, y, w, h) pixels ('coco' format). Bounding-box policy:

- rotation turns a box into the axis-aligned box around its rotated corners (the
  'largest_box' rule), so the box always contains the region it marked;
- ``clip=True`` cuts boxes at the image border (crops and rotation push them past it);
- ``min_visibility=0.5`` (the reference's value) drops a box of which less than half the
  area survives a crop: a sliver at the border would mark a region the image no longer
  shows. The image label never changes; boxes are for scoring heatmaps, not for the loss.

Both transforms are ``A.Compose`` objects called as ``t(image=uint8 (S, S), bboxes=(k, 4))``.
Compose draws from its own random generator, not numpy's global one; ``reseed`` gives it
one shared, seeded stream (see ``pylon.data.dataset`` for per-worker seeding).
"""
from __future__ import annotations

import random
from typing import Union

import albumentations as A
import cv2
import numpy as np

REFERENCE_MEAN = 0.4984
REFERENCE_STD = 0.2483

FloatPair = tuple[float, float]


def _bbox_params(min_visibility: float) -> A.BboxParams:
    return A.BboxParams(format="coco", min_visibility=min_visibility, clip=True, filter_invalid_bboxes=True)


def train_transform(
    image_size: int,
    *,
    rotate_limit: float = 90.0,
    p_rotate: float = 0.5,
    crop_scale: FloatPair = (0.7, 1.0),
    crop_ratio: FloatPair = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    brightness: float = 0.5,
    contrast: float = 0.5,
    p_brightness_contrast: float = 0.5,
    min_visibility: float = 0.5,
    mean: float = REFERENCE_MEAN,
    std: float = REFERENCE_STD,
) -> A.Compose:
    """The reference training augmentation ending in a normalized float tensor (1, S, S)."""
    _check_size(image_size)
    _check_stats(mean, std)
    lo, hi = (float(v) for v in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
    cubic = cv2.INTER_CUBIC
    steps: list = []
    if rotate_limit > 0 and p_rotate > 0:
        steps.append(A.Rotate(limit=rotate_limit, interpolation=cubic, border_mode=cv2.BORDER_CONSTANT,
                              fill=0, p=p_rotate))
    if lo < 1.0:
        steps.append(A.RandomResizedCrop(size=(image_size, image_size), scale=(lo, hi), ratio=tuple(crop_ratio),
                                         interpolation=cubic, p=1.0))
    else:
        steps.append(A.Resize(image_size, image_size, interpolation=cubic))
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if (brightness > 0 or contrast > 0) and p_brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast,
                                                p=p_brightness_contrast))
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), A.ToTensorV2()]
    return A.Compose(steps, bbox_params=_bbox_params(min_visibility))


def eval_transform(image_size: int, *, mean: float = REFERENCE_MEAN, std: float = REFERENCE_STD) -> A.Compose:
    """Deterministic: normalize only (cached images are already image_size x image_size).

    Nothing moves, so boxes pass through untouched (no bbox processing to pay for).
    """
    _check_size(image_size)
    _check_stats(mean, std)
    return A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), A.ToTensorV2()])


def reseed(transform: A.Compose, seed: int) -> None:
    """Give the whole pipeline one seeded random stream.

    ``Compose.set_random_seed`` seeds every child with the *same* seed, which correlates
    their draws (e.g. rotation and flip decisions); one shared generator does not.
    """
    seed = int(seed) % 2**32
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _check_size(image_size: Union[int, np.integer]) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")


def _check_stats(mean: float, std: float) -> None:
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ValueError(f"normalization needs a finite mean and a positive std, got mean={mean!r}, std={std!r}")

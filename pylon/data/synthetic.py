"""Synthetic chest radiographs laid out exactly like the two real downloads.

`python -m pylon.data.synthetic --out datasets/demo` writes, from a seed and in well under a
minute on one core:

- ``kaggle/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``: pediatric-looking grey
  JPEGs of varied, non-square sizes, named like the Kermany et al. files
  (``IM-0115-0001.jpeg``, ``NORMAL2-IM-1427-0001.jpeg``, ``person1_bacteria_1.jpeg``), several
  images per patient, every patient in one split;
- ``rsna/stage_2_train_labels.csv``, ``rsna/stage_2_detailed_class_info.csv`` and
  ``rsna/stage_2_train_images/<patientId>.dcm``: adult-looking 1024x1024 8-bit JPEG Baseline
  DICOMs (a few MONOCHROME1) with one label row per box, like the RSNA challenge files.

Images are rendered from a small anatomical model (body, lungs, heart, mediastinum, spine,
ribs, clavicles, diaphragm, vessels) in a rotated, scaled coordinate frame, so every image
differs in pose, size, exposure and noise. Positives carry soft, patchy opacities inside the
lungs; each RSNA box is the bounding extent of one rendered opacity. Benign look-alikes
(brighter vessels, granulomas, breast shadows, electrodes, markers) appear in both classes
so that no single global feature gives the label away.

The same seed gives byte-identical files: every image draws its randomness from its own
generator keyed by (seed, source, index), JPEG quality is fixed and DICOM UIDs are derived
from the (seeded) patient ids.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from pylon.data.records import Box

# Bumped whenever the rendering changes, so an existing demo set is regenerated.
GENERATOR_VERSION = 1
MARKER_NAME = "demo_complete.json"
KAGGLE_JPEG_QUALITY = 90
RSNA_SIZE = 1024
# RSNA images are rendered at half size and upsampled: the anatomy is smooth, and it keeps
# the default set well under a minute.
RSNA_WORK_DOWNSCALE = 2

_SOURCE_KEYS = {"kaggle": 1, "rsna": 2}


# --------------------------------------------------------------------------------------
# What one image is made of
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anatomy:
    """Patient-level body shape, in thorax units (lung apex to costophrenic angle = 1).

    Coordinates: u to the image right (the patient's left), v downwards; origin on the
    midline halfway between apices and costophrenic angles.
    """

    pediatric: bool
    body_half_width: float
    lung_half_width: float  # lateral extent of the lungs (|u| at the costophrenic angle)
    apex_v: float
    costophrenic_v: float
    dome_top_v: tuple[float, float]  # (image-left = patient right, image-right)
    heart: tuple[float, float, float, float, float]  # u, v, radius u, radius v, tilt (rad)
    mediastinum_half_width: float
    rib_spacing: float
    rib_descent: float  # how steeply posterior ribs fall laterally (kids: flatter)
    rib_thickness: float
    clavicle_v: float
    female: bool


@dataclass(frozen=True)
class Opacity:
    """One patch of airspace disease, in thorax units."""

    u: float
    v: float
    radius_u: float
    radius_v: float
    tilt: float
    amplitude: float  # added density at the core
    patchiness: float  # 0 = smooth, 1 = very mottled
    seed: int


@dataclass(frozen=True)
class ChestSpec:
    """Everything needed to render one image deterministically."""

    height: int
    width: int
    work_downscale: int
    anatomy: Anatomy
    view: str  # 'PA' or 'AP'
    center: tuple[float, float]  # thorax origin in output pixels (x, y)
    scale: float  # output pixels per thorax unit
    angle: float  # radians, rotation of the patient in the image
    opacities: tuple[Opacity, ...]
    exposure: tuple[float, float, float]  # background offset, contrast, gamma
    noise_sigma: float
    vessel_strength: float
    aeration: float  # fraction of the ray through the mid-lung that is air
    granulomas: tuple[tuple[float, float, float], ...]  # (u, v, radius)
    electrodes: tuple[tuple[float, float], ...]  # (u, v) of ECG electrodes
    marker: Optional[tuple[str, float, float]]  # letter and its (x, y) as image fractions
    collimation: tuple[float, float]  # bright unexposed band at the top / bottom (fraction)
    gastric_bubble: bool
    arms: bool  # adults: upper arms visible along the image edges
    texture_seed: int


@dataclass
class RenderedChest:
    image: np.ndarray  # (H, W) uint8, bright = dense
    lung_mask: np.ndarray  # (H, W) bool
    boxes: list[Box] = field(default_factory=list)  # one per opacity, output pixels


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
class _Frame:
    """Maps between pixel grids and thorax coordinates for one image."""

    def __init__(self, spec: ChestSpec, height: int, width: int) -> None:
        ratio = height / spec.height
        self.cx, self.cy = spec.center[0] * ratio, spec.center[1] * ratio
        self.scale = spec.scale * ratio
        self.cos, self.sin = math.cos(spec.angle), math.sin(spec.angle)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = xs + 0.5 - self.cx, ys + 0.5 - self.cy
        self.u = (dx * self.cos + dy * self.sin) / self.scale
        self.v = (-dx * self.sin + dy * self.cos) / self.scale
        self.shape = (height, width)
        self._row_v_range = (self.v.min(axis=1), self.v.max(axis=1))

    def rows_between(self, v_lo: float, v_hi: float) -> slice:
        """The rows that hold any point with v in [v_lo, v_hi] (to skip empty work)."""
        lo, hi = self._row_v_range
        rows = np.nonzero((hi >= v_lo) & (lo <= v_hi))[0]
        return slice(int(rows[0]), int(rows[-1]) + 1) if rows.size else slice(0, 0)

    def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.cx + self.scale * (u * self.cos - v * self.sin) - 0.5
        y = self.cy + self.scale * (u * self.sin + v * self.cos) - 0.5
        return x, y

    def blur(self, image: np.ndarray, sigma_units: float) -> np.ndarray:
        sigma = max(sigma_units * self.scale, 0.3)
        return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 where x << 0, 1 where x >> 0, linear over `width` (a cheap soft edge)."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish-std noise with about `cells` blobs across the larger side."""
    h, w = shape
    gh = max(2, int(round(cells * h / max(h, w)))) + 2
    gw = max(2, int(round(cells * w / max(h, w)))) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    # Resize a padded grid and crop, so the borders are as random as the middle.
    big = cv2.resize(grid, (w * gw // (gw - 2), h * gh // (gh - 2)), interpolation=cv2.INTER_CUBIC)
    oy, ox = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    return big[oy : oy + h, ox : ox + w]


def _band(distance: np.ndarray, half_thickness: float, edge: float = 0.3) -> np.ndarray:
    """Bone-like cross profile: a filled band with brighter cortical rims."""
    d = np.abs(distance) * (1.0 / half_thickness)
    fill = np.sqrt(np.clip(1.0 - d, 0.0, 1.0))
    rim = np.clip(1.0 - np.abs(d - 0.82) * 4.0, 0.0, 1.0)
    return fill + edge * rim * rim


def _lung_depth_inside(u: np.ndarray, v: np.ndarray, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """How far (thorax units, positive = inside) each point lies inside the image-left and
    image-right lung outlines, before the heart is cut out. Works on arrays and scalars."""
    out = []
    for side, dome_top in ((-1.0, a.dome_top_v[0]), (1.0, a.dome_top_v[1])):
        x = side * u
        apex_center = 0.42 * a.lung_half_width
        t = np.clip((v - a.apex_v) / (a.costophrenic_v - a.apex_v), 0.0, 1.0)
        lateral = apex_center + (a.lung_half_width - apex_center) * np.sin(
            0.5 * np.pi * np.clip(t / 0.72, 0.0, 1.0)
        ) ** 0.55
        medial_floor = a.mediastinum_half_width + (0.015 if side > 0 else 0.0)
        medial = apex_center - (apex_center - medial_floor) * np.clip(t / 0.4, 0.0, 1.0) ** 0.5
        dome_center = 0.5 * a.lung_half_width
        k = (a.costophrenic_v - dome_top) / (a.lung_half_width - dome_center) ** 2
        dome = dome_top + k * (x - dome_center) ** 2
        out.append(np.minimum(np.minimum(x - medial, lateral - x), np.minimum(dome - v, v - a.apex_v)))
    return out[0], out[1]


def _heart_radii(a: Anatomy, view: str) -> tuple[float, float, float, float, float]:
    hu, hv, ru, rv, tilt = a.heart
    if view == "AP":  # the heart is farther from the detector: magnified
        ru, rv = ru * 1.1, rv * 1.06
    return hu, hv, ru, rv, tilt


def _heart_level(u: np.ndarray, v: np.ndarray, a: Anatomy, view: str) -> np.ndarray:
    """Elliptic level of the heart outline: < 1 inside, 1 on the border."""
    hu, hv, ru, rv, tilt = _heart_radii(a, view)
    c, s = math.cos(tilt), math.sin(tilt)
    du, dv = u - hu, v - hv
    return ((du * c + dv * s) / ru) ** 2 + ((-du * s + dv * c) / rv) ** 2


def _lung_masks(f: _Frame, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Soft masks (image-left lung, image-right lung), before the heart is cut out."""
    left, right = _lung_depth_inside(f.u, f.v, a)
    return _ramp(left, 0.012), _ramp(right, 0.012)


def _heart_mask(f: _Frame, a: Anatomy, view: str) -> np.ndarray:
    return _ramp(1.0 - _heart_level(f.u, f.v, a, view), 0.12)


def _body_mask_and_density(f: _Frame, a: Anatomy, arms: bool) -> tuple[np.ndarray, np.ndarray]:
    """Soft body silhouette (neck, sloping shoulders, torso, adult arms) and its density."""
    b = a.body_half_width
    outer = b + (0.3 if arms else 0.0)
    neck = 0.17 if a.pediatric else 0.15
    x = np.abs(f.u)
    # Trapezius slope: steep next to the neck, flat over the shoulders, rounded at the end.
    shoulder_top = (a.apex_v - 0.14 - 0.22 * np.exp(-np.clip(x - neck, 0.0, None) / 0.08)
                    + 0.1 * np.clip(x / outer, 0.0, 1.3) ** 3
                    + 0.25 * np.clip((x - 0.8 * outer) / (0.2 * outer), 0.0, None) ** 2)
    below_shoulder = _ramp(f.v - shoulder_top, 0.03)
    waist = b - 0.05 * np.clip((f.v - 0.55) / 0.4, 0.0, 1.0)
    torso = _ramp(waist - x, 0.02) * below_shoulder
    silhouette = np.maximum(torso, _ramp(neck - x, 0.02))
    # Thicker in the middle: an elliptic cross-section.
    thickness = np.sqrt(np.clip(1.0 - (x / (waist + 0.02)) ** 2, 0.0, 1.0))
    density = silhouette * (0.1 + 0.52 * thickness ** 0.6)
    if arms:
        # Upper arms hang beside the chest; above the armpit the shoulder joins them, below
        # it a darker strip of axillary fat separates them from the chest wall.
        arm_center, arm_half = b + 0.17, 0.15
        arm = _ramp(outer - x, 0.04) * below_shoulder * _ramp(x - b, 0.02)
        arm_thickness = np.sqrt(np.clip(1.0 - ((x - arm_center) / arm_half) ** 2, 0.0, 1.0))
        armpit = _ramp(f.v - (a.apex_v + 0.12), 0.15)
        density += arm * (0.12 + 0.33 * arm_thickness + 0.2 * (1.0 - armpit))
        silhouette = np.maximum(silhouette, arm)
        r = np.hypot(x - (b + 0.08), (f.v - (a.apex_v + 0.04)) * 1.1)
        density += arm * (0.05 * _ramp(0.09 - r, 0.03) + 0.04 * np.exp(-(((r - 0.085) / 0.012) ** 2)))
    if a.female and not a.pediatric:
        # Breast shadows: soft density over the lower lateral lungs (a classic mimic of
        # basal opacity, present in both classes).
        for side in (-1.0, 1.0):
            e = ((f.u - side * 0.4) / 0.3) ** 2 + ((f.v - 0.45) / 0.22) ** 2
            density += 0.08 * _ramp(1.0 - e, 0.8)
    return silhouette, density


def _diaphragm_line(f: _Frame, a: Anatomy) -> np.ndarray:
    """v of the diaphragm under each |u| (both domes, joined at the midline)."""
    x = np.abs(f.u)
    top = np.where(f.u < 0, a.dome_top_v[0], a.dome_top_v[1])
    dome_center = 0.5 * a.lung_half_width
    k = (a.costophrenic_v - top) / (a.lung_half_width - dome_center) ** 2
    return top + k * (x - dome_center) ** 2


def _spine_and_mediastinum(f: _Frame, a: Anatomy, heart: np.ndarray) -> np.ndarray:
    m = a.mediastinum_half_width
    above_diaphragm = _ramp(_diaphragm_line(f, a) + 0.02 - f.v, 0.06)
    spine_w = 0.045 if not a.pediatric else 0.05
    spine = _ramp(spine_w - np.abs(f.u), 0.012)
    period = a.rib_spacing * 1.02
    phase = 2 * np.pi * (f.v - a.apex_v) / period
    vertebrae = 0.8 + 0.2 * np.cos(phase) ** 2
    pedicles = np.exp(-(((np.abs(f.u) - spine_w * 0.7) / 0.012) ** 2)) * np.clip(np.cos(phase), 0, 1)
    trachea = _ramp(0.026 - np.abs(f.u + 0.008), 0.01) * _ramp(-0.08 - f.v, 0.05)
    aortic_knob = _ramp(1.0 - np.hypot(f.u - (m + 0.015), f.v - (a.apex_v + 0.3)) / 0.06, 0.4)
    mediastinum = _ramp(m - np.abs(f.u), 0.04)
    return (
        0.06 * mediastinum
        + 0.08 * spine * vertebrae
        + 0.03 * pedicles * spine
        + 0.06 * heart * above_diaphragm
        + 0.06 * aortic_knob
        - 0.1 * trachea
    )


def _ribs(f: _Frame, a: Anatomy) -> np.ndarray:
    out = np.zeros(f.shape, np.float32)
    reach = a.lung_half_width + 0.08
    # Posterior ribs: leave the spine, rise slightly, then fall along the lateral wall.
    start_v = a.apex_v - 0.08
    for i in range(10):
        v0 = start_v + a.rib_spacing * i * (1.0 + 0.035 * i)
        rows = f.rows_between(v0 - 0.05 - 2 * a.rib_thickness,
                              v0 + a.rib_descent * 1.2 + 2 * a.rib_thickness)
        u, v = f.u[rows], f.v[rows]
        t = (np.abs(u) - 0.03) / reach
        tc = np.clip(t, 0.0, 1.1)
        curve = v0 - 0.05 * tc + a.rib_descent * tc ** 1.7
        slope = (-0.05 + 1.7 * a.rib_descent * tc ** 0.7) / reach
        dist = (v - curve) / np.sqrt(1.0 + slope * slope)
        fade = _ramp(t, 0.08) * _ramp(1.08 - t, 0.1)
        out[rows] += (0.075 + 0.004 * i) * _band(dist, a.rib_thickness) * fade
    # Anterior ribs: fainter, from the lateral wall down towards the sternum.
    for i in range(7):
        v0 = a.apex_v + 0.05 + a.rib_spacing * 1.25 * i
        rows = f.rows_between(v0 - 2 * a.rib_thickness, v0 + 0.3 + 2 * a.rib_thickness)
        u, v = f.u[rows], f.v[rows]
        t = np.abs(u) / reach
        tc = np.clip(t, 0.0, 1.0)
        curve = v0 + 0.3 * (1.0 - tc) ** 1.3
        slope = -0.39 * (1.0 - tc) ** 0.3 / reach
        dist = (v - curve) / np.sqrt(1.0 + slope * slope)
        fade = _ramp(t - 0.4, 0.15) * _ramp(1.02 - t, 0.08)
        out[rows] += 0.028 * _band(dist, a.rib_thickness * 0.85, edge=0.25) * fade
    return out


def _shoulder_girdle(f: _Frame, a: Anatomy, view: str) -> np.ndarray:
    out = np.zeros(f.shape, np.float32)
    # Clavicles: S-shaped, from the sternal notch out over the shoulders.
    cv = a.clavicle_v - (0.05 if view == "AP" else 0.0)
    thick = a.rib_thickness * 1.35
    rows = f.rows_between(cv - 0.16 - 2 * thick, cv + 0.03 + 2 * thick)
    t = (np.abs(f.u[rows]) - 0.05) / 0.55
    tc = np.clip(t, 0.0, 1.0)
    curve = cv - 0.12 * tc + 0.025 * np.sin(2 * np.pi * tc)
    band = _band(f.v[rows] - curve, thick)
    out[rows] += 0.17 * band * _ramp(t, 0.05) * _ramp(1.0 - t, 0.05)
    if view == "AP" and not a.pediatric:
        # Scapulae project over the upper lateral lungs on AP films.
        for side in (-1.0, 1.0):
            du, dv = f.u - side * (a.lung_half_width - 0.05), f.v - (a.apex_v + 0.25)
            e = (du / 0.16) ** 2 + (dv / 0.28) ** 2
            out += 0.06 * _ramp(1.0 - e, 0.4)
    return out


def _vessels(f: _Frame, a: Anatomy, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Branching vessel markings fanning out of both hila."""
    canvas = np.zeros(f.shape, np.float32)
    px_per_unit = f.scale
    for side in (-1.0, 1.0):
        hilum_u, hilum_v = side * (a.mediastinum_half_width + 0.05), -0.02
        for _ in range(int(rng.integers(14, 22))):
            angle = rng.uniform(-0.55 * np.pi, 0.55 * np.pi)  # 0 = lateral
            direction = np.array([side * math.cos(angle), math.sin(angle)])
            u, v = hilum_u + rng.normal(0, 0.02), hilum_v + rng.normal(0, 0.04)
            width = rng.uniform(0.010, 0.016)
            value = rng.uniform(0.6, 1.0)
            for _ in range(int(rng.integers(6, 14))):
                turn = rng.normal(0, 0.35)
                c, s = math.cos(turn), math.sin(turn)
                direction = np.array([c * direction[0] - s * direction[1],
                                      s * direction[0] + c * direction[1]])
                # Keep growing away from the midline.
                if direction[0] * side < 0.1:
                    direction[0] = side * 0.3
                direction /= np.linalg.norm(direction)
                step = rng.uniform(0.03, 0.06)
                nu, nv = u + step * direction[0], v + step * direction[1]
                x0, y0 = f.to_pixels(np.float32(u), np.float32(v))
                x1, y1 = f.to_pixels(np.float32(nu), np.float32(nv))
                thickness = max(1, int(round(width * px_per_unit)))
                cv2.line(canvas, (int(round(x0 * 4)), int(round(y0 * 4))),
                         (int(round(x1 * 4)), int(round(y1 * 4))), float(value), thickness,
                         lineType=cv2.LINE_AA, shift=2)
                u, v = nu, nv
                width *= 0.84
                value *= 0.93
    hila = np.zeros(f.shape, np.float32)
    for side in (-1.0, 1.0):
        e = np.hypot((f.u - side * (a.mediastinum_half_width + 0.06)) / 0.07, (f.v + 0.03) / 0.1)
        hila += _ramp(1.0 - e, 0.6)
    return strength * (0.07 * f.blur(canvas, 0.004) + 0.06 * hila)


def _opacity_field(f: _Frame, o: Opacity, lungs: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(o.seed)
    c, s = math.cos(o.tilt), math.sin(o.tilt)
    du, dv = f.u - o.u, f.v - o.v
    e = ((du * c + dv * s) / o.radius_u) ** 2 + ((-du * s + dv * c) / o.radius_v) ** 2
    # Irregular outline: the ellipse is stretched by low-frequency noise.
    cells = max(3, int(round(4 / max(o.radius_u, o.radius_v))))
    e = e * np.exp(0.45 * _smooth_noise(rng, f.shape, cells))
    core = np.clip(1.0 - e, 0.0, 1.0) ** 0.6
    mottle = np.clip(1.0 + o.patchiness * 0.4 * _smooth_noise(rng, f.shape, cells * 3), 0.3, 1.6)
    field_ = core * mottle
    # Consolidation stops at the pleura: keep it inside the (slightly eroded) lungs.
    field_ *= np.clip((lungs - 0.25) / 0.6, 0.0, 1.0)
    field_ = f.blur(field_.astype(np.float32), 0.015)
    return o.amplitude * field_


def _extent_box(field_: np.ndarray, downscale: int, fraction: float = 0.03) -> Optional[Box]:
    """Bounding box (x, y, w, h) in output pixels enclosing the whole opacity.

    Like the RSNA readers' boxes it is generous: everything above a small fraction of the
    peak, plus one working pixel for the spread of upsampling.
    """
    peak = float(field_.max())
    if peak <= 0:
        return None
    ys, xs = np.nonzero(field_ >= fraction * peak)
    h, w = field_.shape
    x0, x1 = max(int(xs.min()) - 1, 0) * downscale, min(int(xs.max()) + 2, w) * downscale
    y0, y1 = max(int(ys.min()) - 1, 0) * downscale, min(int(ys.max()) + 2, h) * downscale
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def render_chest(spec: ChestSpec, *, with_opacities: bool = True) -> RenderedChest:
    """Render one radiograph. `with_opacities=False` gives the identical image minus disease."""
    ds = spec.work_downscale
    h, w = spec.height // ds, spec.width // ds
    f = _Frame(spec, h, w)
    a = spec.anatomy

    def tex(part: int) -> np.random.Generator:
        # One stream per texture, so removing the opacities leaves every other pixel as is.
        return np.random.default_rng([spec.texture_seed, part])

    heart = _heart_mask(f, a, spec.view)
    left, right = _lung_masks(f, a)
    lungs = np.clip(left + right, 0.0, 1.0) * (1.0 - heart)
    lungs = f.blur(lungs.astype(np.float32), 0.008)

    silhouette, density = _body_mask_and_density(f, a, spec.arms)
    # Uneven soft tissue and bowel gas below the diaphragm.
    density *= 1.0 + 0.04 * _smooth_noise(tex(5), f.shape, 8)
    below_diaphragm = _ramp(f.v - _diaphragm_line(f, a) - 0.05, 0.1)
    gas = np.clip(_smooth_noise(tex(6), f.shape, 20) - 1.1, 0.0, None)
    density -= 0.08 * below_diaphragm * silhouette * gas
    density += _spine_and_mediastinum(f, a, heart)
    # Aerated lung: darker in its middle, less so at apex and base where more tissue overlaps.
    tau = np.clip((f.v - a.apex_v) / (a.costophrenic_v - a.apex_v), 0.0, 1.0)
    depth = spec.aeration * (0.85 + 0.15 * np.sin(np.pi * tau))
    depth = depth * (1.0 + 0.12 * _smooth_noise(tex(1), f.shape, 6))
    density *= 1.0 - depth * lungs
    if spec.gastric_bubble:
        e = np.hypot((f.u - 0.48 * a.lung_half_width) / 0.09,
                     (f.v - (a.dome_top_v[1] + 0.1)) / 0.05)
        density -= 0.16 * _ramp(1.0 - e, 0.5)
    # Soft tissue hides bone contrast (the film saturates there), so bones show mainly where
    # they cross the aerated lungs.
    density += silhouette * (0.25 + 0.75 * lungs) * (1.0 - 0.6 * below_diaphragm) * _ribs(f, a)
    density += silhouette * _shoulder_girdle(f, a, spec.view)
    density += lungs * _vessels(f, a, tex(2), spec.vessel_strength)
    density += 0.018 * lungs * _smooth_noise(tex(3), f.shape, 60)
    for gu, gv, gr in spec.granulomas:
        density += 0.22 * _ramp(1.0 - np.hypot(f.u - gu, f.v - gv) / gr, 0.5)

    boxes: list[Box] = []
    if with_opacities:
        for o in spec.opacities:
            op = _opacity_field(f, o, lungs)
            box = _extent_box(op, ds)
            if box is not None:
                boxes.append(box)
                density += op

    # Tone curve: radiographs saturate in dense regions.
    offset, contrast, gamma = spec.exposure
    body = 1.0 - np.exp(-2.4 * np.clip(density, 0.0, None))
    image = offset + contrast * body ** gamma

    for eu, ev in spec.electrodes:
        r = np.hypot(f.u - eu, f.v - ev)
        image += 0.35 * np.exp(-(((r - 0.028) / 0.007) ** 2)) + 0.12 * _ramp(0.02 - r, 0.01)

    noise_rng = tex(4)
    image = image.astype(np.float32)
    image += spec.noise_sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    if ds > 1:
        # Upsampled noise is grainy rather than per-pixel, like a real detector's; a weak
        # per-pixel part on top keeps the full-size image from looking smoothed.
        image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_CUBIC)
        image += 0.25 * spec.noise_sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
        lungs = cv2.resize(lungs, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    top, bottom = spec.collimation
    if top > 0:
        image[: int(top * spec.height)] = 0.95
    if bottom > 0:
        image[spec.height - int(bottom * spec.height):] = 0.95
    pixels = np.round(np.clip(image * 255.0, 0, 255)).astype(np.uint8)
    if spec.marker is not None:
        letter, mx, my = spec.marker
        size = spec.height / 300.0
        cv2.putText(pixels, letter, (int(mx * spec.width), int(my * spec.height)),
                    cv2.FONT_HERSHEY_DUPLEX, size, 245, max(1, int(size * 2)), cv2.LINE_AA)
    return RenderedChest(image=pixels, lung_mask=lungs > 0.5, boxes=boxes)


# --------------------------------------------------------------------------------------
# Sampling random patients and images
# --------------------------------------------------------------------------------------
def sample_anatomy(rng: np.random.Generator, *, pediatric: bool, female: bool) -> Anatomy:
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if pediatric:
        # Children: rounder thorax, relatively larger heart, thin chest wall, flat ribs.
        lung_hw = j(0.6, 0.68)
        heart = (j(0.08, 0.12), j(0.17, 0.22), j(0.29, 0.34), j(0.21, 0.25), j(0.2, 0.45))
        return Anatomy(
            pediatric=True, body_half_width=lung_hw + j(0.05, 0.09), lung_half_width=lung_hw,
            apex_v=-0.5, costophrenic_v=0.5, dome_top_v=(j(0.24, 0.3), j(0.28, 0.34)),
            heart=heart, mediastinum_half_width=j(0.09, 0.12), rib_spacing=j(0.085, 0.095),
            rib_descent=j(0.2, 0.3), rib_thickness=j(0.02, 0.025), clavicle_v=j(-0.4, -0.34),
            female=female,
        )
    lung_hw = j(0.56, 0.64)
    heart = (j(0.09, 0.13), j(0.19, 0.24), j(0.24, 0.29), j(0.17, 0.21), j(0.25, 0.5))
    return Anatomy(
        pediatric=False, body_half_width=lung_hw + j(0.08, 0.14), lung_half_width=lung_hw,
        apex_v=-0.5, costophrenic_v=0.5, dome_top_v=(j(0.2, 0.28), j(0.25, 0.33)),
        heart=heart, mediastinum_half_width=j(0.07, 0.09), rib_spacing=j(0.085, 0.095),
        rib_descent=j(0.36, 0.46), rib_thickness=j(0.018, 0.023), clavicle_v=j(-0.42, -0.36),
        female=female,
    )


def _lung_point(
    rng: np.random.Generator, a: Anatomy, view: str, side: float, zone: str, margin: float
) -> tuple[float, float]:
    """A point at least `margin` inside one lung and clear of the heart.

    zone: 'lower', 'upper', 'perihilar' or 'any' (vertical band of the lung to draw from).
    """
    lo, hi = {"lower": (0.0, 0.35), "upper": (-0.35, 0.0), "perihilar": (-0.15, 0.15),
              "any": (-0.35, 0.35)}[zone]
    best, best_depth = (side * 0.5 * a.lung_half_width, 0.0), -np.inf
    for _ in range(200):
        u = side * float(rng.uniform(0.0, a.lung_half_width))
        v = float(rng.uniform(lo, hi))
        depth = _lung_depth_inside(u, v, a)[0 if side < 0 else 1]
        clear_of_heart = math.sqrt(_heart_level(u, v, a, view)) - 1.0
        depth = min(float(depth), clear_of_heart * 0.2)
        if depth >= margin:
            return u, v
        if depth > best_depth:  # small lungs: settle for the deepest point seen
            best, best_depth = (u, v), depth
    return best


def sample_opacities(
    rng: np.random.Generator, a: Anatomy, view: str, n: int, *, kind: str, strength: float
) -> tuple[Opacity, ...]:
    """`kind`: 'lobar' (dense, large), 'patchy' (fainter, smaller, perihilar) or 'rsna'.

    The first opacity goes in a random lung, the second in the other one (bilateral
    disease, like most two-box RSNA cases), further ones in a free zone of the first lung.
    """
    if n <= 0:
        return ()
    sides = [float(rng.choice([-1.0, 1.0]))]
    if n >= 2:
        sides.append(-sides[0])
    while len(sides) < n:
        sides.append(sides[len(sides) % 2])
    used_zones: dict[float, list[str]] = {}
    out = []
    for side in sides:
        zones = used_zones.setdefault(side, [])
        if kind == "patchy":
            zone = "perihilar" if not zones else "lower"
        elif not zones:
            zone = "lower" if rng.random() < 0.7 else "any"
        else:
            zone = "upper" if zones[-1] != "upper" else "lower"
        zones.append(zone)
        # Amplitudes (added density at the core) are tuned so that a small CNN trained from
        # scratch for a couple of CPU minutes at 128 px separates the classes (AUROC ~0.9+)
        # while the weakest opacities stay subtle.
        if kind == "patchy":
            ru, rv, amp = rng.uniform(0.06, 0.1), rng.uniform(0.08, 0.13), rng.uniform(0.24, 0.44)
        elif kind == "lobar":
            ru, rv, amp = rng.uniform(0.07, 0.13), rng.uniform(0.09, 0.18), rng.uniform(0.3, 0.58)
        else:
            ru, rv, amp = rng.uniform(0.06, 0.13), rng.uniform(0.08, 0.18), rng.uniform(0.28, 0.55)
        u, v = _lung_point(rng, a, view, side, zone, margin=0.5 * min(ru, rv))
        out.append(Opacity(
            u=u, v=v, radius_u=float(ru), radius_v=float(rv), tilt=float(rng.uniform(-0.5, 0.5)),
            amplitude=float(amp * strength), patchiness=float(rng.uniform(0.3, 1.0)),
            seed=int(rng.integers(2**31)),
        ))
    return tuple(out)


def _sample_granulomas(rng: np.random.Generator, a: Anatomy, view: str, p: float) -> tuple:
    out = []
    while rng.random() < p and len(out) < 3:
        u, v = _lung_point(rng, a, view, float(rng.choice([-1.0, 1.0])), "any", margin=0.03)
        out.append((u, v, float(rng.uniform(0.008, 0.016))))
    return tuple(out)


def sample_kaggle_image(
    rng: np.random.Generator, a: Anatomy, *, n_opacities: int, kind: str, strength: float
) -> ChestSpec:
    """One pediatric image of patient `a`: landscape-ish, 300-480 px wide."""
    width = int(rng.integers(300, 481)) // 4 * 4
    height = int(width * rng.uniform(0.68, 0.95)) // 4 * 4
    view = "AP" if rng.random() < 0.5 else "PA"
    # Thorax fills a good part of the height; children are positioned less consistently.
    scale = height * float(rng.uniform(0.6, 0.72))
    center = (width / 2 + float(rng.normal(0, 0.03)) * width,
              height * float(rng.uniform(0.46, 0.56)))
    n_electrodes = int(rng.integers(1, 4)) if rng.random() < 0.35 else 0
    return ChestSpec(
        height=height, width=width, work_downscale=1, anatomy=a, view=view,
        center=center, scale=scale, angle=float(rng.normal(0, 0.04)),
        opacities=sample_opacities(rng, a, view, n_opacities, kind=kind, strength=strength),
        exposure=(float(rng.uniform(0.02, 0.08)), float(rng.uniform(0.8, 1.0)),
                  float(rng.uniform(0.8, 1.3))),
        noise_sigma=float(rng.uniform(0.008, 0.02)),
        vessel_strength=float(rng.uniform(0.7, 1.5)),
        aeration=float(rng.uniform(0.66, 0.8)),
        granulomas=_sample_granulomas(rng, a, view, 0.1),
        electrodes=tuple((float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.4, 0.5)))
                         for _ in range(n_electrodes)),
        marker=("R", float(rng.uniform(0.03, 0.12)), float(rng.uniform(0.12, 0.3)))
        if rng.random() < 0.7 else None,
        collimation=(0.0, 0.0),
        gastric_bubble=bool(rng.random() < 0.6),
        arms=False,
        texture_seed=int(rng.integers(2**31)),
    )


def sample_rsna_image(
    rng: np.random.Generator, a: Anatomy, *, view: str, n_opacities: int, not_normal: bool,
    strength: float,
) -> ChestSpec:
    """One adult 1024x1024 image of patient `a`."""
    scale = RSNA_SIZE * float(rng.uniform(0.52, 0.6))
    center = (RSNA_SIZE / 2 + float(rng.normal(0, 12)), RSNA_SIZE * float(rng.uniform(0.43, 0.5)))
    if not_normal:
        # 'No Lung Opacity / Not Normal': something else is wrong or present (enlarged
        # heart, calcified granulomas), never an airspace opacity.
        hu, hv, ru, rv, tilt = a.heart
        a = replace(a, heart=(hu, hv, ru * float(rng.uniform(1.1, 1.25)), rv * 1.1, tilt))
    ap = view == "AP"
    n_electrodes = int(rng.integers(1, 4)) if ap and rng.random() < 0.4 else 0
    return ChestSpec(
        height=RSNA_SIZE, width=RSNA_SIZE, work_downscale=RSNA_WORK_DOWNSCALE, anatomy=a,
        view=view, center=center, scale=scale, angle=float(rng.normal(0, 0.03)),
        opacities=sample_opacities(rng, a, view, n_opacities, kind="rsna", strength=strength),
        exposure=(float(rng.uniform(0.01, 0.05)), float(rng.uniform(0.85, 1.0)),
                  float(rng.uniform(0.8, 1.3))),
        noise_sigma=float(rng.uniform(0.004, 0.01)),
        vessel_strength=float(rng.uniform(0.7, 1.6)),
        aeration=float(rng.uniform(0.66, 0.82)),
        granulomas=_sample_granulomas(rng, a, view, 0.5 if not_normal else 0.08),
        electrodes=tuple((float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, -0.2)))
                         for _ in range(n_electrodes)),
        marker=(str(rng.choice(["L", "R"])), float(rng.uniform(0.05, 0.9)),
                float(rng.uniform(0.05, 0.12))) if rng.random() < 0.6 else None,
        collimation=(float(rng.uniform(0.01, 0.04)) if rng.random() < 0.15 else 0.0, 0.0),
        gastric_bubble=bool(rng.random() < 0.6),
        arms=bool(rng.random() < 0.6),
        texture_seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------------
# Data sets on disk
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the generated files (recorded in the completion marker)."""

    seed: int = 0
    n_kaggle_patients: int = 200
    kaggle_val_images: int = 8
    kaggle_test_fraction: float = 0.2
    n_rsna: int = 360
    rsna_positive_fraction: float = 0.35
    rsna_monochrome1_fraction: float = 0.05
    rsna_transfer_syntax: str = "jpeg-baseline"
    opacity_strength: float = 1.0

    def validate(self) -> None:
        if self.n_kaggle_patients < 6:
            raise ValueError(
                f"n_kaggle_patients={self.n_kaggle_patients}: need at least 6 (3 per class) so "
                "that train, val and test each get a NORMAL and a PNEUMONIA patient"
            )
        if self.n_rsna < 2:
            raise ValueError(f"n_rsna={self.n_rsna}: need at least 2 (a positive and a negative)")
        for name in ("kaggle_test_fraction", "rsna_positive_fraction", "rsna_monochrome1_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1]")
        if self.kaggle_val_images < 2:
            raise ValueError(f"kaggle_val_images={self.kaggle_val_images}: need at least 2")
        if self.opacity_strength <= 0:
            raise ValueError(f"opacity_strength={self.opacity_strength} must be positive")


def _rng(settings: DemoSettings, source: str, *keys: int) -> np.random.Generator:
    # Keyed, not sequential: one image's randomness never depends on how many came before.
    return np.random.default_rng([settings.seed, _SOURCE_KEYS[source], *keys])


@dataclass(frozen=True)
class KaggleImagePlan:
    """One Kaggle-style file: where it goes and how to draw it."""

    split: str  # 'train' | 'val' | 'test'
    folder: str  # 'NORMAL' | 'PNEUMONIA'
    name: str  # e.g. 'person12_bacteria_47.jpeg'
    patient_index: int
    spec: ChestSpec

    @property
    def relative_path(self) -> str:
        return f"chest_xray/{self.split}/{self.folder}/{self.name}"


@dataclass(frozen=True)
class RsnaImagePlan:
    """One RSNA-style DICOM and its label-file rows."""

    patient_id: str
    label: int
    detail_class: str
    view: str
    age: int
    sex: str
    pixel_spacing: float
    monochrome1: bool
    spec: ChestSpec


@dataclass
class _KagglePatient:
    index: int
    label: int
    kind: str  # 'normal', 'bacteria' or 'virus'
    n_images: int
    split: str = "train"
    names: list[str] = field(default_factory=list)


def _plan_kaggle_patients(settings: DemoSettings) -> list[_KagglePatient]:
    """Labels, image counts, splits and real-style file names for every Kaggle patient."""
    rng = _rng(settings, "kaggle", 0)
    n = settings.n_kaggle_patients
    n_normal = max(3, min(n - 3, int(round(n * 0.45))))
    labels = rng.permutation([0] * n_normal + [1] * (n - n_normal))
    patients = []
    for i, label in enumerate(labels):
        if label == 0:
            kind, n_images = "normal", int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        else:
            kind = "bacteria" if rng.random() < 0.65 else "virus"
            n_images = int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.3, 0.25, 0.18, 0.12]))
        patients.append(_KagglePatient(index=i, label=int(label), kind=kind, n_images=n_images))

    # Splits by patient, per class: test first, then a tiny val (the official one has 16
    # images), the rest train; every split keeps at least one patient of each class.
    for label in (0, 1):
        group = [p for p in patients if p.label == label]
        n_test = min(len(group) - 2, max(1, int(round(len(group) * settings.kaggle_test_fraction))))
        for p in group[:n_test]:
            p.split = "test"
        rest = sorted(group[n_test:], key=lambda p: (p.n_images, p.index))
        want = max(1, settings.kaggle_val_images // 2)
        got = 0
        for p in rest[:-1]:
            if got >= want:
                break
            p.split = "val"
            got += p.n_images

    # File names: NORMAL 'IM-0115-0001.jpeg' / 'NORMAL2-IM-1427-0001.jpeg' (+ '-0002' for a
    # further image), PNEUMONIA 'person12_bacteria_47.jpeg' with a running counter per kind.
    counters = {"bacteria": 0, "virus": 0}
    im_number = {"IM": 0, "NORMAL2-IM": 0}
    person = 0
    for p in patients:
        if p.label == 0:
            prefix = "IM" if rng.random() < 0.6 else "NORMAL2-IM"
            im_number[prefix] += int(rng.integers(1, 8))
            stem = f"{prefix}-{im_number[prefix]:04d}-0001"
            p.names = [f"{stem}.jpeg"] + [f"{stem}-{k + 1:04d}.jpeg" for k in range(1, p.n_images)]
        else:
            person += int(rng.integers(1, 6))
            for _ in range(p.n_images):
                counters[p.kind] += int(rng.integers(1, 4))
                p.names.append(f"person{person}_{p.kind}_{counters[p.kind]}.jpeg")
    return patients


def plan_kaggle(settings: DemoSettings) -> list[KaggleImagePlan]:
    """Every Kaggle-style image of the set, with its drawing spec (nothing is rendered)."""
    settings.validate()
    plans = []
    for p in _plan_kaggle_patients(settings):
        rng = _rng(settings, "kaggle", p.index + 1)
        anatomy = sample_anatomy(rng, pediatric=True, female=bool(rng.random() < 0.5))
        for k, name in enumerate(p.names):
            # Follow-up films of one child: same body, new pose, exposure and disease.
            image_rng = _rng(settings, "kaggle", p.index + 1, k + 1)
            if p.kind == "normal":
                n_op, kind = 0, "lobar"
            elif p.kind == "bacteria":  # lobar consolidation
                n_op, kind = int(image_rng.choice([1, 2], p=[0.7, 0.3])), "lobar"
            else:  # viral: patchy, bilateral, perihilar
                n_op, kind = int(image_rng.choice([2, 3], p=[0.6, 0.4])), "patchy"
            spec = sample_kaggle_image(image_rng, anatomy, n_opacities=n_op, kind=kind,
                                       strength=settings.opacity_strength)
            plans.append(KaggleImagePlan(
                split=p.split, folder="NORMAL" if p.label == 0 else "PNEUMONIA", name=name,
                patient_index=p.index, spec=spec,
            ))
    return plans


def plan_rsna(settings: DemoSettings) -> list[RsnaImagePlan]:
    """Every RSNA-style image of the set, with its header fields and drawing spec."""
    settings.validate()
    n = settings.n_rsna
    plan_rng = _rng(settings, "rsna", 0)
    n_pos = max(1, min(n - 1, int(round(n * settings.rsna_positive_fraction))))
    labels = plan_rng.permutation([1] * n_pos + [0] * (n - n_pos))
    n_mono1 = int(round(n * settings.rsna_monochrome1_fraction))
    if settings.rsna_monochrome1_fraction > 0 and n >= 4:
        n_mono1 = max(1, n_mono1)
    monochrome1 = set(plan_rng.choice(n, size=n_mono1, replace=False).tolist())
    plans = []
    for i in range(n):
        rng = _rng(settings, "rsna", i + 1)
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        label = int(labels[i])
        female = bool(rng.random() < 0.43)
        age = int(np.clip(rng.normal(48, 16), 18, 90))
        # View and label are associated in the real data (sicker patients are filmed AP).
        view = "AP" if rng.random() < (0.75 if label else 0.38) else "PA"
        if label:
            n_op = int(rng.choice([1, 2, 3], p=[0.44, 0.53, 0.03]))
            detail = "Lung Opacity"
        else:
            n_op = 0
            detail = "Normal" if rng.random() < 0.45 else "No Lung Opacity / Not Normal"
        anatomy = sample_anatomy(rng, pediatric=False, female=female)
        spec = sample_rsna_image(rng, anatomy, view=view, n_opacities=n_op,
                                 not_normal=detail != "Normal" and not label,
                                 strength=settings.opacity_strength)
        plans.append(RsnaImagePlan(
            patient_id=patient_id, label=label, detail_class=detail, view=view, age=age,
            sex="F" if female else "M", pixel_spacing=round(float(rng.uniform(0.139, 0.171)), 3),
            monochrome1=i in monochrome1, spec=spec,
        ))
    return plans


def _write_kaggle(root: Path, settings: DemoSettings, progress: bool) -> dict[str, int]:
    from tqdm import tqdm

    plans = plan_kaggle(settings)
    counts: dict[str, int] = {}
    for split in ("train", "val", "test"):
        for folder in ("NORMAL", "PNEUMONIA"):
            (root / "chest_xray" / split / folder).mkdir(parents=True, exist_ok=True)
    for plan in tqdm(plans, desc="kaggle", unit="img", disable=not progress, mininterval=2.0):
        image = render_chest(plan.spec).image
        Image.fromarray(image, mode="L").save(
            root / plan.relative_path, format="JPEG", quality=KAGGLE_JPEG_QUALITY
        )
        key = f"{plan.split}/{plan.folder}"
        counts[key] = counts.get(key, 0) + 1
    counts["patients"] = len({plan.patient_index for plan in plans})
    return counts


def _write_rsna(root: Path, settings: DemoSettings, progress: bool) -> dict[str, int]:
    from tqdm import tqdm

    from pylon.data.dicom_writer import write_dicom

    images_dir = root / "stage_2_train_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_rsna(settings)
    label_rows: list[list[str]] = []
    class_rows: list[list[str]] = []
    n_boxes = 0
    for plan in tqdm(plans, desc="rsna", unit="img", disable=not progress, mininterval=2.0):
        rendered = render_chest(plan.spec)
        if plan.label and not rendered.boxes:
            raise RuntimeError(f"RSNA image {plan.patient_id} is positive but has no opacity box")
        # MONOCHROME1 stores inverted values: a reader that honours it sees the same anatomy.
        pixels = 255 - rendered.image if plan.monochrome1 else rendered.image
        write_dicom(
            images_dir / f"{plan.patient_id}.dcm", pixels,
            transfer_syntax=settings.rsna_transfer_syntax,
            photometric="MONOCHROME1" if plan.monochrome1 else "MONOCHROME2",
            PatientID=plan.patient_id, PatientName=plan.patient_id, PatientAge=str(plan.age),
            PatientSex=plan.sex, ViewPosition=plan.view,
            PixelSpacing=[plan.pixel_spacing, plan.pixel_spacing], Modality="CR",
            BodyPartExamined="CHEST", ConversionType="WSD",
        )
        if plan.label:
            for x, y, w, h in rendered.boxes:
                label_rows.append([plan.patient_id, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}", "1"])
            n_boxes += len(rendered.boxes)
        else:
            label_rows.append([plan.patient_id, "", "", "", "", "0"])
        class_rows.append([plan.patient_id, plan.detail_class])

    _write_csv(root / "stage_2_train_labels.csv",
               ["patientId", "x", "y", "width", "height", "Target"], label_rows)
    _write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], class_rows)
    return {"images": len(plans), "positive": sum(p.label for p in plans), "boxes": n_boxes,
            "label_rows": len(label_rows), "monochrome1": sum(p.monochrome1 for p in plans)}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _marker_content(settings: DemoSettings) -> dict:
    return {"generator_version": GENERATOR_VERSION, "settings": asdict(settings)}


def is_complete(out: Path, settings: DemoSettings) -> bool:
    """True when `out` holds a finished demo set made with exactly these settings."""
    marker = Path(out) / MARKER_NAME
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    expected = _marker_content(settings)
    return all(recorded.get(key) == value for key, value in expected.items())


def is_generated_demo(out: Path | str) -> bool:
    """True when `out` holds a finished demo set from this generator version, whatever its
    size settings (so a set made with custom sizes is not silently replaced)."""
    try:
        recorded = json.loads((Path(out) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("generator_version") == GENERATOR_VERSION


def generate_demo(
    out: Path | str = Path("datasets/demo"),
    *,
    seed: int = 0,
    n_kaggle_patients: int = DemoSettings.n_kaggle_patients,
    n_rsna: int = DemoSettings.n_rsna,
    kaggle_val_images: int = DemoSettings.kaggle_val_images,
    rsna_positive_fraction: float = DemoSettings.rsna_positive_fraction,
    rsna_transfer_syntax: str = DemoSettings.rsna_transfer_syntax,
    opacity_strength: float = DemoSettings.opacity_strength,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the demo data set to `out` (``out/kaggle`` and ``out/rsna``) and return `out`.

    Idempotent: when `out` already holds a complete set made with the same settings (its
    marker file says so), nothing is done. The set is built in a sibling folder and moved
    into place at the end, so an interrupted run never leaves a half-written `out`. An
    existing `out` is replaced only if it is an earlier demo set (has the marker) or empty.
    """
    out = Path(out)
    settings = DemoSettings(
        seed=seed, n_kaggle_patients=n_kaggle_patients, n_rsna=n_rsna,
        kaggle_val_images=kaggle_val_images, rsna_positive_fraction=rsna_positive_fraction,
        rsna_transfer_syntax=rsna_transfer_syntax, opacity_strength=opacity_strength,
    )
    settings.validate()
    if not force and is_complete(out, settings):
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).exists():
        raise FileExistsError(
            f"{out} is not empty and is not a demo data set made by this generator (no "
            f"{MARKER_NAME}); refusing to overwrite it. Delete it or choose another --out."
        )

    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted run of ours
    staging.mkdir(parents=True)
    kaggle_counts = _write_kaggle(staging / "kaggle", settings, progress)
    rsna_counts = _write_rsna(staging / "rsna", settings, progress)
    marker = dict(_marker_content(settings), counts={"kaggle": kaggle_counts, "rsna": rsna_counts})
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="python -m pylon.data.synthetic",
        description="Write a small synthetic data set laid out like the Kaggle pneumonia and "
                    "RSNA pneumonia downloads (see datasets/README.md).",
    )
    parser.add_argument("--out", type=Path, default=Path("datasets/demo"),
                        help="output folder (default: datasets/demo)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--n-kaggle-patients", type=int, default=defaults.n_kaggle_patients,
                        help="Kaggle-style patients (about 2.3 images each)")
    parser.add_argument("--n-rsna", type=int, default=defaults.n_rsna,
                        help="RSNA-style images (one per patient)")
    parser.add_argument("--kaggle-val-images", type=int, default=defaults.kaggle_val_images)
    parser.add_argument("--rsna-positive-fraction", type=float,
                        default=defaults.rsna_positive_fraction)
    parser.add_argument("--rsna-transfer-syntax", default=defaults.rsna_transfer_syntax,
                        help="DICOM compression (default jpeg-baseline, like the real files)")
    parser.add_argument("--opacity-strength", type=float, default=defaults.opacity_strength,
                        help="scales how dense the pneumonia opacities are (1.0 = default)")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if a complete set with these settings exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_demo(
            args.out, seed=args.seed, n_kaggle_patients=args.n_kaggle_patients,
            n_rsna=args.n_rsna, kaggle_val_images=args.kaggle_val_images,
            rsna_positive_fraction=args.rsna_positive_fraction,
            rsna_transfer_syntax=args.rsna_transfer_syntax,
            opacity_strength=args.opacity_strength, force=args.force,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = json.loads((out / MARKER_NAME).read_text())["counts"]
    print(f"kaggle: {sum(v for k, v in counts['kaggle'].items() if '/' in k)} images of "
          f"{counts['kaggle']['patients']} patients -> {out / 'kaggle' / 'chest_xray'}")
    print(f"rsna:   {counts['rsna']['images']} images, {counts['rsna']['positive']} positive, "
          f"{counts['rsna']['boxes']} boxes -> {out / 'rsna'}")
    print(f"done in {time.perf_counter() - start:.1f} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

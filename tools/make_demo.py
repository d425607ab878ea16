"""Synthetic chest X-rays laid out exactly like the two real downloads, for `make demo` and tests.

`python tools/make_demo.py --out datasets/demo` writes Kaggle-style JPEG folders and RSNA-style labels CSVs
and DICOMs (datasets/README.md lists them). The phantom is plain on purpose: a grey body, two dark lungs, a
brighter mediastinum and heart, smooth noise. Pneumonia adds one or two bright, blurry opacities inside a
lung, and each RSNA box is the extent of one opacity, so heatmaps can be scored against it. Every image
draws from its own generator keyed by (seed, source, index), so the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom.config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ComputedRadiographyImageStorage as CR_STORAGE, JPEGBaseline8Bit, generate_uid
from tqdm import tqdm

GENERATOR_VERSION = 4  # bump when the files change, so older demo sets are rebuilt
MARKER = "demo_complete.json"  # written last: its presence means the set is complete
RSNA_SIZE = 512
JPEG_QUALITY = 90
KAGGLE, RSNA = 1, 2  # source keys of the per-image generators


@dataclass
class Film:
    """One file to write: where, its label, and the key of the generator that draws it."""

    path: str  # relative to the demo root
    label: int
    key: tuple[int, ...]
    height: int
    width: int
    n_opacities: int
    header: dict = field(default_factory=dict)  # RSNA only: DICOM fields
    detail: str = ""  # RSNA only: the detailed class


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """0 below -width/2, 1 above width/2, linear between: a soft edge."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


def _waves(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, n: int, freq: tuple) -> np.ndarray:
    """Smooth unit-variance noise on the grid of row `u` (1, W) and column `v` (H, 1): `n` random plane waves,
    `freq` in radians per unit, summed as one small matrix product by cos(a + b) = cos a cos b - sin a sin b."""
    angle, f, phase = rng.uniform([0, freq[0], 0], [2 * np.pi, freq[1], 2 * np.pi], (n, 3)).T
    a, b = f[:, None] * np.cos(angle)[:, None] * u, f * np.sin(angle) * v + phase  # (n, W), (H, n)
    return np.hstack([np.cos(b), -np.sin(b)]) @ np.vstack([np.cos(a), np.sin(a)]) * np.sqrt(2.0 / n)


def render(film: Film, *, with_opacities: bool = True) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """The film's pixels (uint8, bright = dense) and one box (x, y, width, height) per opacity; without
    opacities, the same image without disease (all draws are still made). Coordinates: u to the right, v
    down, in units of about half the lungs' height."""
    rng = np.random.default_rng(film.key)
    h, w = film.height, film.width
    scale = h * rng.uniform(0.38, 0.44)  # pixels per unit
    cx, cy = w * (0.5 + rng.normal(0, 0.02)), h * rng.uniform(0.45, 0.52)
    u = ((np.arange(w) + 0.5 - cx) / scale)[None, :]  # broadcast: images are u x v grids
    v = ((np.arange(h) + 0.5 - cy) / scale)[:, None]

    body_w, lung_x, lung_w, lung_y, lung_h = rng.uniform([0.85, 0.4, 0.26, -0.05, 0.54],
                                                         [0.98, 0.48, 0.31, 0.02, 0.62])
    heart_x, heart_y, heart_w, heart_h = rng.uniform([0.08, 0.25, 0.26, 0.18], [0.14, 0.33, 0.32, 0.24])
    air, offset, contrast = rng.uniform([0.45, 0.02, 0.85], [0.6, 0.08, 1.05])

    def lungs_and_centre(u, v):
        """Soft lung mask and mediastinum-plus-heart mask (works on scalars too)."""
        mediastinum = _soft(0.1 + 0.05 * np.clip(v + 0.6, 0, 1) - np.abs(u), 0.04) * _soft(0.3 - v, 0.1)
        centre = np.maximum(mediastinum * _soft(v + 0.9, 0.1),
                            _soft(1.0 - ((u - heart_x) / heart_w) ** 2 - ((v - heart_y) / heart_h) ** 2, 0.3))
        lung = _soft(1.0 - ((np.abs(u) - lung_x) / lung_w) ** 2 - ((v - lung_y) / lung_h) ** 2, 0.15)
        return lung * (1.0 - centre), centre

    lungs, centre = lungs_and_centre(u, v)
    shoulders = _soft(v + 0.9 - 0.25 * (u / body_w) ** 2, 0.1)
    body = np.maximum(_soft(body_w - np.abs(u), 0.06) * shoulders, _soft(0.22 - np.abs(u), 0.05))
    density = body * (0.5 + 0.15 * np.sqrt(np.clip(1.0 - (u / body_w) ** 2, 0.0, 1.0))) + 0.12 * centre
    density = density * (1.0 - air * lungs) + 0.03 * _waves(rng, u, v, 8, (1.0, 6.0))
    density += 0.015 * lungs * _waves(rng, u, v, 12, (15.0, 40.0))  # fine lung markings

    boxes = []
    first = float(rng.choice([-1.0, 1.0]))
    for side in [first, -first][: film.n_opacities]:  # a second opacity goes in the other lung
        for _ in range(100):  # a point well inside the lung, clear of the heart
            a, b = rng.uniform(-0.55, 0.55, 2)
            ou, ov = side * (lung_x + a * lung_w), lung_y + b * lung_h
            if a * a + b * b < 0.3 and lungs_and_centre(ou, ov)[1] < 0.05:
                break
        ru, rv, amp = rng.uniform([0.11, 0.14, 0.30], [0.18, 0.24, 0.45])
        e = ((u - ou) / ru) ** 2 + ((v - ov) / rv) ** 2
        opacity = amp * np.exp(-1.5 * e * np.exp(0.25 * _waves(rng, u, v, 4, (4.0, 10.0)))) * lungs
        y, x = np.nonzero(opacity >= 0.1 * opacity.max())
        boxes.append((float(x.min()), float(y.min()), float(x.max() - x.min() + 1), float(y.max() - y.min() + 1)))
        if with_opacities:
            density += opacity
    image = offset + contrast * density + rng.normal(0.0, 0.012, (h, w))
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), boxes if with_opacities else []


def plan_kaggle(seed: int, n_patients: int) -> list[Film]:
    """Kaggle-style films: about 35% normal children (1-2 films), the rest pneumonia (1-4 films). Per class,
    about 20% of the patients go to test, then patients to val until it holds at least 4 films (the official
    val is that small), the rest to train."""
    rng = np.random.default_rng([seed, KAGGLE])
    n_normal = min(max(3, round(0.35 * n_patients)), n_patients - 3)
    labels = rng.permutation([0] * n_normal + [1] * (n_patients - n_normal))
    counts = [int(rng.choice([1, 2], p=[0.6, 0.4]) if y == 0
                  else rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.25, 0.15])) for y in labels]
    split = {}
    for label in (0, 1):
        group = [i for i, y in enumerate(labels) if y == label]
        n_test = max(1, round(0.2 * len(group)))
        split.update({i: "test" for i in group[:n_test]})
        n_val = 0
        for i in group[n_test:-1]:
            split[i], n_val = "val", n_val + counts[i]
            if n_val >= 4:
                break
    films, number, person, shots = [], {"IM": 0, "NORMAL2-IM": 0}, 0, {"bacteria": 0, "virus": 0}
    for i, (label, count) in enumerate(zip(labels, counts)):
        if label == 0:
            prefix = "IM" if rng.random() < 0.6 else "NORMAL2-IM"
            number[prefix] += int(rng.integers(1, 8))
            stem = f"{prefix}-{number[prefix]:04d}-0001"
            names = [f"{stem}.jpeg"] + [f"{stem}-{k + 1:04d}.jpeg" for k in range(1, count)]
        else:
            person += int(rng.integers(1, 6))
            kind = "bacteria" if rng.random() < 0.65 else "virus"
            names = []
            for _ in range(count):
                shots[kind] += int(rng.integers(1, 4))
                names.append(f"person{person}_{kind}_{shots[kind]}.jpeg")
        folder = f"kaggle/chest_xray/{split.get(i, 'train')}/{'PNEUMONIA' if label else 'NORMAL'}"
        for k, name in enumerate(names):
            size = np.random.default_rng([seed, KAGGLE, i, k, 0])
            width = int(size.integers(320, 449))
            height = round(width / size.uniform(1.3, 1.5))
            n_opacities = int(label) * int(size.choice([1, 2], p=[0.7, 0.3]))
            films.append(Film(f"{folder}/{name}", int(label), (seed, KAGGLE, i, k), height, width, n_opacities))
    return films


def plan_rsna(seed: int, n: int) -> list[Film]:
    """RSNA-style films: about 35% positive with one or two boxes, AP views commoner among them."""
    n_pos = min(max(1, round(0.35 * n)), n - 1)
    labels = np.random.default_rng([seed, RSNA]).permutation([1] * n_pos + [0] * (n - n_pos))
    films = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng([seed, RSNA, i, 0])
        patient = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        view = "AP" if rng.random() < (0.75 if label else 0.38) else "PA"
        age, sex = str(int(np.clip(rng.normal(48, 16), 18, 90))), "F" if rng.random() < 0.43 else "M"
        detail = "Lung Opacity" if label else ("Normal" if rng.random() < 0.45 else "No Lung Opacity / Not Normal")
        header = dict(PatientID=patient, PatientName=patient, PatientAge=age, PatientSex=sex, ViewPosition=view,
                      SeriesDescription=f"view: {view}", PixelSpacing=[0.28, 0.28])
        films.append(Film(f"rsna/stage_2_train_images/{patient}.dcm", int(label), (seed, RSNA, i, 1),
                          RSNA_SIZE, RSNA_SIZE, int(label) * int(rng.choice([1, 2], p=[0.45, 0.55])), header, detail))
    return films


def write_dicom(path: Path, pixels: np.ndarray, header: dict) -> None:
    """A CR chest DICOM with JPEG-baseline pixels like the RSNA files; UIDs derive from the patient id."""
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=JPEG_QUALITY)
    uid = {part: generate_uid(entropy_srcs=[header["PatientID"], part]) for part in ("study", "series", "instance")}
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, uid["instance"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid["study"], uid["series"]
    ds.Modality, ds.BodyPartExamined, ds.ConversionType = "CR", "CHEST", "WSD"
    with pydicom.config.disable_value_validation():  # real RSNA ages are bare '58', not '058Y'
        ds.update(header)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds.save_as(path, enforce_file_format=True)


def _marker(root: Path) -> dict:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def is_generated_demo(root: Path | str) -> bool:
    """True when `root` holds a complete demo set of this generator version (any size or seed)."""
    return _marker(Path(root)).get("generator_version") == GENERATOR_VERSION


def generate_demo(root: Path | str, *, seed: int = 0, n_kaggle_patients: int = 200, n_rsna: int = 360,
                  progress: bool = True) -> Path:
    """Write the demo set to ``root/kaggle`` and ``root/rsna``, or reuse a complete one of the same settings;
    return `root`. Built in a sibling staging folder renamed into place, so an interrupted run leaves no
    half-written `root`; an existing `root` is replaced only when it is an earlier demo set or empty."""
    if n_kaggle_patients < 6 or n_rsna < 2:
        raise ValueError(f"n_kaggle_patients={n_kaggle_patients} and n_rsna={n_rsna}: need at least 6 "
                         "(every Kaggle split gets both classes) and 2 (a positive and a negative)")
    root = Path(root)
    settings = dict(generator_version=GENERATOR_VERSION, seed=seed, n_kaggle_patients=n_kaggle_patients, n_rsna=n_rsna)
    if settings.items() <= _marker(root).items():  # this very set is there already
        return root
    if root.exists() and not _marker(root) and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} is not empty and is not a demo set (no {MARKER}); refusing to "
                              "overwrite it. Delete it or choose another folder.")
    staging = root.parent / f".{root.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    kaggle, rsna = plan_kaggle(seed, n_kaggle_patients), plan_rsna(seed, n_rsna)
    labels, classes = [["patientId", "x", "y", "width", "height", "Target"]], [["patientId", "class"]]
    for film in tqdm(kaggle + rsna, desc="demo data", unit="img", disable=not progress):
        path = staging / film.path
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels, boxes = render(film)
        if film.path.startswith("kaggle/"):
            Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)
            continue
        write_dicom(path, pixels, film.header)
        patient = film.header["PatientID"]
        rows = [[patient, *(f"{c:.1f}" for c in box), "1"] for box in boxes]
        labels += rows or [[patient, "", "", "", "", "0"]]
        classes += [[patient, film.detail]] * max(1, len(rows))  # the real file repeats a patient once per box row
    # as for the real films, some people have two: consecutive films share a person now and then
    films = [film.header["PatientID"] for film in rsna]
    people = [["patientId", "nih_patient"]] + [[f, f"{i // 2 if i % 10 < 2 else 10_000 + i:08d}"] for i, f in enumerate(films)]
    for name, table in (("stage_2_train_labels.csv", labels), ("stage_2_detailed_class_info.csv", classes),
                        ("nih_patient_map.csv", people)):
        with open(staging / "rsna" / name, "w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(table)
    counts = {"kaggle_images": len(kaggle), "kaggle_positive": sum(f.label for f in kaggle), "rsna_images": n_rsna,
              "rsna_positive": sum(f.label for f in rsna), "rsna_boxes": sum(f.n_opacities for f in rsna)}
    (staging / MARKER).write_text(json.dumps({**settings, "counts": counts}, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/make_demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("datasets/demo"), help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-kaggle-patients", type=int, default=200, help="Kaggle-style children, ~2 films each")
    parser.add_argument("--n-rsna", type=int, default=360, help="RSNA-style images, one per patient")
    args = parser.parse_args(argv)
    try:
        out = generate_demo(args.out, seed=args.seed, n_kaggle_patients=args.n_kaggle_patients, n_rsna=args.n_rsna)
    except (ValueError, FileExistsError) as error:
        sys.exit(f"error: {error}")
    counts = _marker(out)["counts"]
    print(f"{out}: {counts['kaggle_images']} Kaggle-style films ({counts['kaggle_positive']} pneumonia), "
          f"{counts['rsna_images']} RSNA-style DICOMs ({counts['rsna_positive']} positive, "
          f"{counts['rsna_boxes']} boxes)")


if __name__ == "__main__":
    main()

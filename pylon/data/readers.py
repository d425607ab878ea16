"""Read any supported radiograph file into one 2-D uint8 array, bright = dense.

DICOM (detected by content, every transfer syntax pydicom can decode), JPEG and PNG (turned as
their EXIF Orientation says, as viewers show them); colour becomes its luminance. Whatever
cannot honestly become a single grey radiograph raises ImageReadError naming the file and why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import JPEGBaseline8Bit

from pylon import PylonError

log = logging.getLogger(__name__)
logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # not its tracebacks: read_image says why in one line
_warned: set[str] = set()  # kinds of warning already given in this process
HEADER_TAGS = ("ViewPosition", "PatientAge", "PatientSex", "SeriesDescription")  # what sources take from a DICOM


class ImageReadError(PylonError, ValueError):
    """A file that cannot be read as a radiograph; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # DataLoader workers pickle exceptions back to the main process
        return (type(self), (self.path, self.reason))


def read_image(path: str | Path) -> np.ndarray:
    """The image at `path` as a 2-D np.uint8 array (H, W), MONOCHROME2 sense; a bad file raises ImageReadError."""
    return read_image_with_header(path)[0]


def read_image_with_header(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """read_image's array and, from the same read, a DICOM's HEADER_TAGS ("" where absent; {} for JPEG, PNG)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except FileNotFoundError:
        missing = f"broken symbolic link to {os.readlink(path)}" if path.is_symlink() else "file not found"
        raise ImageReadError(path, missing) from None
    except OSError as error:
        raise ImageReadError(path, f"cannot open file ({error})") from None
    if not head:
        raise ImageReadError(path, "file is empty (0 bytes)")
    pillow_magic = head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))
    # DICOM by content; old DICOM files may lack the preamble, so a DICOM suffix is tried too
    dicom = head[128:132] == b"DICM" or (not pillow_magic and path.suffix.lower() in (".dcm", ".dicom", ".dic"))
    try:
        with warnings.catch_warnings(record=True) as caught:  # pydicom warns where it could raise: not shown,
            warnings.simplefilter("always")  # kept to explain missing pixels
            return _read_dicom(path, head[128:132] == b"DICM", caught) if dicom else (_read_with_pillow(path), {})
    except ImageReadError:
        raise
    except Exception as error:  # corrupt data, a malformed header value, ...: one line naming the file
        kind = "not a readable DICOM file" if dicom else "corrupt or truncated image"
        raise ImageReadError(path, f"{kind} ({_describe(error)})") from error


def _describe(error: BaseException) -> str:
    """'Type: message' on one line (pydicom puts whole tracebacks into some messages)."""
    return f"{type(error).__name__}: {' '.join(str(error).split('Traceback')[0].split())}"


def _warn_once(kind: str, message: str, *args) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning(message + " (said once per process)", *args)


def _read_dicom(path: Path, has_preamble: bool, caught: list) -> tuple[np.ndarray, dict[str, str]]:
    ds = pydicom.dcmread(path, force=not has_preamble)
    if "PixelData" not in ds:
        truncation = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
        if truncation:
            raise ImageReadError(path, f"DICOM file is truncated ({truncation[0]})")
        raise ImageReadError(path, "DICOM file has no pixel data" if has_preamble else
                             "not a DICOM file (no 'DICM' signature and no pixel data)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); expected a single radiograph")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if not photometric:  # pydicom cannot decode without it either
        raise ImageReadError(path, "DICOM PhotometricInterpretation (0028,0004) is missing or empty; "
                                   "expected MONOCHROME1 or MONOCHROME2 for a radiograph")
    colour = samples == 3 or photometric == "PALETTE COLOR"  # secondary captures of films, mostly
    if not colour and (samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2")):
        raise ImageReadError(path, f"unsupported DICOM image ({photometric}, {samples} samples per pixel)")
    modality = str(ds.get("Modality") or "CR").strip().upper()
    if modality not in ("CR", "DX"):
        _warn_once("modality", "%s: DICOM Modality %s is not a radiograph (CR, DX); reading it anyway", path, modality)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = _decode_pixels(ds, syntax)
        grey = _colour_to_grey(pixels, ds, photometric) if colour else \
            _dicom_to_uint8(pixels, ds, inverted=photometric == "MONOCHROME1")
    except Exception as error:
        name = syntax.name if syntax else "unknown transfer syntax"
        raise ImageReadError(path, f"cannot decode DICOM pixel data or apply its LUT ({name}; "
                                   f"{_describe(error)})") from error
    if colour:
        _warn_once("colour", "%s: colour DICOM (%s) converted to grey by luminance", path, photometric)
    return grey, {tag: str(ds.get(tag, "") or "").strip() for tag in HEADER_TAGS}


def _colour_to_grey(pixels: np.ndarray, ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    """Rec. 601 luminance of the RGB pydicom gives (it converts YBR); palette entries span their
    own bit depth, other colour samples BitsStored."""
    palette = photometric == "PALETTE COLOR"
    rgb = apply_color_lut(pixels, ds) if palette else pixels
    top = np.iinfo(rgb.dtype).max if palette else 2 ** int(ds.get("BitsStored", ds.BitsAllocated)) - 1
    grey = rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    return np.clip(np.rint(grey * np.float32(255.0 / top)), 0, 255).astype(np.uint8)


def _decode_pixels(ds: pydicom.Dataset, syntax) -> np.ndarray:
    if syntax == JPEGBaseline8Bit:
        with contextlib.suppress(Exception):  # else pydicom's other plugins try, and report their own error
            return pixel_array(ds, decoding_plugin="pillow")  # libjpeg-turbo: RSNA films ~3x faster than pylibjpeg
    return ds.pixel_array


def _dicom_to_uint8(values: np.ndarray, ds: pydicom.Dataset, inverted: bool) -> np.ndarray:
    has_modality = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if values.dtype == np.uint8 and not has_modality and not has_voi:  # all RSNA files: nothing to map
        return (255 - values) if inverted else values
    values = apply_modality_lut(values, ds) if has_modality else values
    if has_voi:
        values, (low, high) = apply_voi_lut(values, ds, index=0), _voi_output_range(ds)
    else:
        # No window: fit the display to the pixel data, as viewers do. BitsStored only bounds
        # the data (12-bit films declared 16 are common), and a few extreme pixels (markers,
        # collimator edges) must not set the contrast.
        low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
        if high <= low:
            low, high = float(np.min(values)), float(np.max(values))
        if high <= low:  # a flat image: black, as a flat PNG
            return np.zeros(values.shape, np.uint8)
    if not np.isfinite([low, high]).all() or high <= low:
        raise ValueError(f"LUT/window output range [{low}, {high}] is empty")
    scaled = (values.astype(np.float32) - low) * np.float32(255.0 / (high - low))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return (255 - out) if inverted else out


def _voi_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """What the window or VOI LUT makes of the extreme stored values: a window's bounds map to 0
    and 255 (its output spans what pydicom derives from BitsStored and the rescale)."""
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], np.int64)
    mapped = apply_voi_lut(apply_modality_lut(extremes, ds), ds, index=0)
    return float(np.min(mapped)), float(np.max(mapped))


def _read_with_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.format not in ("JPEG", "PNG"):
                raise ImageReadError(path, f"unsupported image format {image.format}; expected DICOM, JPEG or PNG")
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise ImageReadError(path, f"{image.format} has {frames} frames; expected one image")
            image.load()  # decode now, so truncation surfaces here
            return _pillow_to_uint8(ImageOps.exif_transpose(image))  # as viewers show it (EXIF Orientation)
    except UnidentifiedImageError:
        raise ImageReadError(path, "unknown file format; expected DICOM, JPEG or PNG") from None
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\d+", str(error))
        raise ImageReadError(path, f"too large to decode safely ({pixels and pixels.group()} pixels; Pillow's limit "
                                   f"is {2 * Image.MAX_IMAGE_PIXELS}, twice PIL.Image.MAX_IMAGE_PIXELS)") from None


def _pillow_to_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grey: stretch the used range to 0..255 (no bit depth is recorded, and
        # clipping to 255 would turn a 12- or 16-bit radiograph white); a flat image is black
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return np.rint((values - low) * np.float32(255.0 / ((high - low) or 1.0))).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # transparent pixels carry undefined colour: show them as background (black)
        rgba = image.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        return np.rint(grey * alpha).astype(np.uint8)
    return np.asarray(image.convert("L"))  # 1, P, RGB, CMYK, YCbCr, ...

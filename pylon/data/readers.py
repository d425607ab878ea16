"""Read any supported radiograph file into one 2-D uint8 array, bright = dense.

DICOM (detected by content, every common transfer syntax), JPEG and PNG. Whatever cannot
honestly become a single grey radiograph raises ImageReadError naming the file and why.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Union

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.pixels.decoders import JPEGBaseline8BitDecoder
from pydicom.uid import JPEGBaseline8Bit

PathLike = Union[str, Path]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PILLOW_FORMATS = ("JPEG", "PNG")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageReadError(ValueError):
    """A file that cannot be read as a radiograph; the message names the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        # DataLoader workers pickle exceptions back to the main process.
        return (type(self), (self.path, self.reason))


class DatasetLayoutError(ValueError):
    """A data set folder or label file that does not have the expected layout."""


def read_image(path: PathLike) -> np.ndarray:
    """Return the image at `path` as a 2-D np.uint8 array (H, W) in MONOCHROME2 sense."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot access file ({error})") from None
    if path.is_dir():
        raise ImageReadError(path, "is a directory")
    if size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as error:
        raise ImageReadError(path, f"cannot open file ({error})") from None
    if is_dicom_header(head):
        return _read_dicom(path, has_preamble=True)
    if head.startswith(_JPEG_MAGIC) or head.startswith(_PNG_MAGIC):
        return _read_with_pillow(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        # Old DICOM files may lack the preamble; parse them leniently.
        return _read_dicom(path, has_preamble=False)
    return _read_with_pillow(path)


def is_dicom_header(head: bytes) -> bool:
    """True for the DICOM Part 10 signature: a 128-byte preamble followed by 'DICM'."""
    return len(head) >= 132 and head[128:132] == b"DICM"


# ---------------------------------------------------------------- DICOM


def _read_dicom(path: Path, has_preamble: bool) -> np.ndarray:
    try:
        with warnings.catch_warnings(record=True) as caught:
            # pydicom warns on header quirks and, instead of raising, on truncation;
            # the warnings are kept to explain a missing Pixel Data element below.
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not has_preamble)
    except Exception as error:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"not a readable DICOM file ({type(error).__name__}: {error})") from error
    if "PixelData" not in ds:
        truncation = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
        if truncation:
            raise ImageReadError(path, f"DICOM file is truncated ({truncation[0]})")
        if not has_preamble:
            raise ImageReadError(path, "not a DICOM file (no 'DICM' signature and no pixel data)")
    _check_dicom_is_radiograph(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = _decode_pixels(ds)
    except Exception as error:
        syntax = _transfer_syntax_name(ds)
        raise ImageReadError(
            path, f"cannot decode DICOM pixel data ({syntax}; {type(error).__name__}: {error})"
        ) from error
    if stored.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel data has shape {stored.shape}, expected one 2-D frame")
    try:
        return _dicom_to_uint8(stored, ds)
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(
            path, f"cannot apply the DICOM LUT/window ({type(error).__name__}: {error})"
        ) from error


def _decode_pixels(ds: Dataset) -> np.ndarray:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax == JPEGBaseline8Bit and "pillow" in JPEGBaseline8BitDecoder.available_plugins:
        try:
            # Pillow's libjpeg-turbo decodes RSNA-size images ~3x faster than pylibjpeg.
            return pixel_array(ds, decoding_plugin="pillow")
        except Exception:
            pass  # fall through to pydicom's other plugins, which report their own error
    return ds.pixel_array


def _transfer_syntax_name(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"transfer syntax {uid.name}" if uid else "unknown transfer syntax"


def _check_dicom_is_radiograph(ds: Dataset, path: Path) -> None:
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        detail = f" (only {kinds[0]}, which radiographs never use)" if kinds else ""
        raise ImageReadError(path, f"DICOM file has no pixel data{detail}")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise ImageReadError(path, f"DICOM file lacks {keyword}, so its pixels cannot be decoded")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); expected a single radiograph")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples != 1 or photometric not in _MONOCHROME:
        raise ImageReadError(
            path,
            f"colour DICOM ({photometric}, {samples} samples per pixel) is not a grey radiograph",
        )


def _dicom_to_uint8(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    has_modality = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if stored.dtype == np.uint8 and not has_modality and not has_voi:
        # The common case (all RSNA files): nothing to map, skip float work.
        return (255 - stored) if inverted else stored

    # The output range is what the LUT chain makes of the extreme stored values, so a
    # 12-bit image fills 0..255 and a window's bounds map to 0 and 255.
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    else:
        extremes = np.array([0, 2**bits - 1], dtype=np.int64)
    values = stored
    if has_modality:
        values = apply_modality_lut(values, ds)
        extremes = apply_modality_lut(extremes, ds)
    if has_voi:
        values = apply_voi_lut(values, ds, index=0)
        extremes = apply_voi_lut(extremes, ds, index=0)
    low, high = float(np.min(extremes)), float(np.max(extremes))
    if not np.isfinite([low, high]).all() or high <= low:
        raise ValueError(f"LUT/window output range [{low}, {high}] is empty")
    scaled = (values.astype(np.float32) - low) * np.float32(255.0 / (high - low))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return (255 - out) if inverted else out


# ---------------------------------------------------------------- JPEG / PNG


def _read_with_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image_format = image.format
            if image_format not in PILLOW_FORMATS:
                raise ImageReadError(
                    path, f"unsupported image format {image_format}; expected DICOM, JPEG or PNG"
                )
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise ImageReadError(path, f"{image_format} has {frames} frames; expected one image")
            image.load()  # decodes now, so truncation surfaces here rather than later
            return _pillow_to_uint8(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "unknown file format; expected DICOM, JPEG or PNG") from None
    except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ...
        raise ImageReadError(path, f"corrupt or truncated image ({type(error).__name__}: {error})") from error


def _pillow_to_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grey: stretch the used range to 0..255 (no bit depth is recorded, and
        # clipping to 255 would turn a 12- or 16-bit radiograph white).
        values = np.asarray(image).astype(np.float32)
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.rint((values - low) * np.float32(255.0 / (high - low))).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels carry undefined colour; show them as background (black).
        rgba = image.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        return np.rint(grey * alpha).astype(np.uint8)
    return np.asarray(image.convert("L"))  # 1, P, RGB, CMYK, YCbCr, ...

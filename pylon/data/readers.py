"""Read any supported radiograph file into one 2-D uint8 array, bright = dense.

DICOM (detected by content, every transfer syntax pydicom can decode), JPEG and PNG. Whatever
cannot honestly become a single grey radiograph raises ImageReadError naming the file and why.
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

from pylon.data.records import DatasetLayoutError  # noqa: F401  (re-exported: readers' errors in one place)

PathLike = Union[str, Path]


class ImageReadError(ValueError):
    """A file that cannot be read as a radiograph; the message names the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # DataLoader workers pickle exceptions back to the main process
        return (type(self), (self.path, self.reason))


def read_image(path: PathLike) -> np.ndarray:
    """The image at `path` as a 2-D np.uint8 array (H, W) in MONOCHROME2 sense."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot open file ({error})") from None
    if not head:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if head[128:132] == b"DICM":
        return _read_dicom(path, has_preamble=True)
    pillow_magic = head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))
    if not pillow_magic and path.suffix.lower() in (".dcm", ".dicom", ".dic"):
        return _read_dicom(path, has_preamble=False)  # old DICOM files may lack the preamble
    return _read_with_pillow(path)


def _read_dicom(path: Path, has_preamble: bool) -> np.ndarray:
    try:
        with warnings.catch_warnings(record=True) as caught:
            # pydicom warns, instead of raising, on truncation: kept to explain missing pixels
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
        raise ImageReadError(path, "DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); expected a single radiograph")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(path, f"colour DICOM ({photometric}, {samples} samples per pixel) "
                                   "is not a grey radiograph")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _dicom_to_uint8(_decode_pixels(ds, syntax), ds, inverted=photometric == "MONOCHROME1")
    except Exception as error:
        name = syntax.name if syntax else "unknown transfer syntax"
        raise ImageReadError(path, f"cannot decode DICOM pixel data or apply its LUT ({name}; "
                                   f"{type(error).__name__}: {error})") from error


def _decode_pixels(ds: Dataset, syntax) -> np.ndarray:
    if syntax == JPEGBaseline8Bit and "pillow" in JPEGBaseline8BitDecoder.available_plugins:
        try:  # Pillow's libjpeg-turbo decodes RSNA-size images ~3x faster than pylibjpeg
            return pixel_array(ds, decoding_plugin="pillow")
        except Exception:
            pass  # pydicom's other plugins report their own error
    return ds.pixel_array


def _dicom_to_uint8(stored: np.ndarray, ds: Dataset, inverted: bool) -> np.ndarray:
    has_modality = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if stored.dtype == np.uint8 and not has_modality and not has_voi:  # all RSNA files: nothing to map
        return (255 - stored) if inverted else stored
    # The output range is what the LUT chain makes of the extreme stored values, so a 12-bit
    # image fills 0..255 and a window's bounds map to 0 and 255.
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], np.int64)
    values = stored
    if has_modality:
        values, extremes = apply_modality_lut(values, ds), apply_modality_lut(extremes, ds)
    if has_voi:
        values, extremes = apply_voi_lut(values, ds, index=0), apply_voi_lut(extremes, ds, index=0)
    low, high = float(np.min(extremes)), float(np.max(extremes))
    if not np.isfinite([low, high]).all() or high <= low:
        raise ValueError(f"LUT/window output range [{low}, {high}] is empty")
    scaled = (values.astype(np.float32) - low) * np.float32(255.0 / (high - low))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return (255 - out) if inverted else out


def _read_with_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.format not in ("JPEG", "PNG"):
                raise ImageReadError(path, f"unsupported image format {image.format}; expected DICOM, JPEG or PNG")
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise ImageReadError(path, f"{image.format} has {frames} frames; expected one image")
            image.load()  # decode now, so truncation surfaces here
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
        # clipping to 255 would turn a 12- or 16-bit radiograph white)
        values = np.asarray(image).astype(np.float32)
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.rint((values - low) * np.float32(255.0 / (high - low))).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # transparent pixels carry undefined colour: show them as background (black)
        rgba = image.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        return np.rint(grey * alpha).astype(np.uint8)
    return np.asarray(image.convert("L"))  # 1, P, RGB, CMYK, YCbCr, ...

"""Write realistic chest radiograph DICOM files, compressed the way real archives store them.

Used to build demo data and to make test files of every kind the reader must handle
(each transfer syntax, 8/12/16-bit, MONOCHROME1, windows, colour, multi-frame, no pixels).
Output is deterministic: UIDs are derived from the header and the file name, not random.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit-little": ExplicitVRLittleEndian,
    "implicit-little": ImplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}

# Friendly names accepted in **header besides plain DICOM keywords (e.g. PatientID=...).
_ALIASES = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "view": "ViewPosition",
    "view_position": "ViewPosition",
    "age": "PatientAge",
    "patient_age": "PatientAge",
    "sex": "PatientSex",
    "patient_sex": "PatientSex",
    "pixel_spacing": "PixelSpacing",
    "window_center": "WindowCenter",
    "window_width": "WindowWidth",
    "rescale_slope": "RescaleSlope",
    "rescale_intercept": "RescaleIntercept",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
}

_DEFAULTS: dict[str, Any] = {
    "PatientID": "anonymous",
    "ViewPosition": "PA",
    "PatientAge": "045Y",
    "PatientSex": "M",
    "PixelSpacing": [0.139, 0.139],
    "Modality": "CR",
    "BodyPartExamined": "CHEST",
    "StudyDate": "19010101",
    "StudyTime": "000000.00",
}


def format_age(age: Union[int, str]) -> str:
    """DICOM Age String: an int of years becomes '045Y'; strings pass through unchanged."""
    if isinstance(age, (int, np.integer)):
        if not 0 <= int(age) <= 999:
            raise ValueError(f"age {age} is outside 0..999 years")
        return f"{int(age):03d}Y"
    return str(age)


def write_dicom(
    path: Union[str, Path],
    pixels: Optional[np.ndarray],
    *,
    transfer_syntax: str = "jpeg-baseline",
    photometric: str = "MONOCHROME2",
    bits_stored: Optional[int] = None,
    **header: Any,
) -> Path:
    """Write `pixels` as a CR chest radiograph DICOM file and return its path.

    pixels: (H, W) grey, (F, H, W) multi-frame grey, (H, W, 3) / (F, H, W, 3) with
        photometric='RGB'; uint8, uint16 or int16. Stored as given: for MONOCHROME1 pass
        values that are already inverted. None writes a header-only file (no Pixel Data).
    transfer_syntax: one of TRANSFER_SYNTAXES ('jpeg-baseline' is lossy, 8-bit only, like
        the RSNA challenge files; 'rle', 'jpeg-ls', 'jpeg2000' are lossless).
    bits_stored: defaults to 8 for 8-bit arrays and 16 otherwise (pass 12 for 12-bit data
        in a 16-bit container).
    header: DICOM keywords (PatientID='p1', WindowCenter=2048, ...) or the aliases in
        _ALIASES (patient_id, view, age, sex, pixel_spacing, window_center, ...). An int age
        becomes '045Y'. Unspecified fields get chest-radiograph defaults.
    """
    path = Path(path)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"unknown transfer_syntax {transfer_syntax!r}; choose one of {sorted(TRANSFER_SYNTAXES)}"
        )
    tsuid = TRANSFER_SYNTAXES[transfer_syntax]
    fields = dict(_DEFAULTS)
    for key, value in header.items():
        keyword = _ALIASES.get(key, key)
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword or alias {key!r} for {path}")
        fields[keyword] = value
    fields["PatientAge"] = format_age(fields["PatientAge"])
    fields.setdefault("PatientName", fields["PatientID"])
    fields.setdefault("SeriesDescription", f"view: {fields['ViewPosition']}")

    # Derived from content so that re-running a generator gives byte-identical files.
    entropy = [str(fields["PatientID"]), path.name]
    study_uid = generate_uid(entropy_srcs=entropy + ["study"])
    series_uid = generate_uid(entropy_srcs=entropy + ["series"])
    instance_uid = generate_uid(entropy_srcs=entropy + ["instance"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = tsuid
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientBirthDate = ""
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.StudyID = ""
    ds.PatientOrientation = ""
    # Real archives hold non-conforming values (RSNA ages are bare '58', not '058Y'); the
    # writer reproduces whatever it is given rather than warning about it.
    with pydicom.config.disable_value_validation():
        for keyword, value in fields.items():
            setattr(ds, keyword, value)

    if pixels is not None:
        _set_pixels(ds, np.asarray(pixels), tsuid, photometric, bits_stored, path)

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_pixels(
    ds: Dataset,
    arr: np.ndarray,
    tsuid: UID,
    photometric: str,
    bits_stored: Optional[int],
    path: Path,
) -> None:
    colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422")
    spatial_ndim = 3 if colour else 2
    if arr.ndim not in (spatial_ndim, spatial_ndim + 1):
        raise ValueError(f"pixels of shape {arr.shape} do not fit photometric {photometric} ({path})")
    if colour and arr.shape[-1] != 3:
        raise ValueError(f"colour pixels need 3 samples in the last axis, got {arr.shape} ({path})")
    if arr.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"pixels must be uint8, uint16 or int16, got {arr.dtype} ({path})")
    n_frames = arr.shape[0] if arr.ndim == spatial_ndim + 1 else 1
    rows, cols = (arr.shape[-3], arr.shape[-2]) if colour else arr.shape[-2:]
    bits_allocated = arr.dtype.itemsize * 8
    bits_stored = bits_stored or bits_allocated
    signed = arr.dtype == np.int16
    if not signed and arr.size and int(arr.max()) >= 2**bits_stored:
        raise ValueError(f"pixel values up to {arr.max()} do not fit in {bits_stored} bits ({path})")

    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if n_frames > 1:
        ds.NumberOfFrames = n_frames

    if tsuid == JPEGBaseline8Bit:
        if arr.dtype != np.uint8:
            raise ValueError(f"jpeg-baseline stores 8-bit data only, got {arr.dtype} ({path})")
        frames = arr if n_frames > 1 else arr[None]
        ds.PixelData = encapsulate([_jpeg_bytes(frame) for frame in frames])
        ds["PixelData"].VR = "OB"
        if colour:
            # Pillow stores colour JPEG as YCbCr; the header must say so.
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    elif tsuid.is_compressed:
        ds.compress(tsuid, arr, generate_instance_uid=False)
    else:
        ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"


def _jpeg_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # quality 95 with 4:2:2 chroma keeps test tolerances tight and mirrors clinical exports.
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95, subsampling=1)
    return buffer.getvalue()

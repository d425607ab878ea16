"""Test helper: write real chest radiograph DICOM files with pydicom, in every flavour the reader
must handle (transfer syntaxes, bit depths, MONOCHROME1, windows, colour, multi-frame, no pixels)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom.config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless, generate_uid)

TRANSFER_SYNTAXES = {
    "explicit-little": ExplicitVRLittleEndian,
    "implicit-little": ImplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,  # lossy, 8-bit only, like the RSNA challenge files
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path: Path, pixels: Optional[np.ndarray], *, transfer_syntax: str = "jpeg-baseline",
                photometric: str = "MONOCHROME2", bits_stored: Optional[int] = None, **header: Any) -> Path:
    """Write `pixels` ((H, W), (F, H, W), or (..., 3) with photometric='RGB'; uint8, uint16 or
    int16, stored as given) as a CR chest DICOM; None writes a file without Pixel Data. `header`
    holds DICOM keywords (PatientID='p1', WindowCenter=2048, ...)."""
    path, syntax = Path(path), TRANSFER_SYNTAXES[transfer_syntax]
    uid = generate_uid(entropy_srcs=[str(header.get("PatientID", "")), path.name])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CR_IMAGE_STORAGE, uid
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CR_IMAGE_STORAGE, uid, uid, uid
    with pydicom.config.disable_value_validation():  # RSNA ages are bare '58', not '058Y'
        for keyword, value in {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA", **header}.items():
            setattr(ds, keyword, value)
    if pixels is not None:
        arr = np.asarray(pixels)
        colour = photometric == "RGB"
        frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if colour else 1), photometric
        if colour:
            ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(arr.dtype == np.int16)
        if frames > 1:
            ds.NumberOfFrames = frames
        if syntax == JPEGBaseline8Bit:
            ds.PixelData = encapsulate([_jpeg(frame) for frame in (arr if frames > 1 else arr[None])])
            ds["PixelData"].VR = "OB"
            if colour:
                ds.PhotometricInterpretation = "YBR_FULL_422"  # Pillow stores colour JPEG as YCbCr
        elif syntax.is_compressed:
            ds.compress(syntax, arr, generate_instance_uid=False)
        else:
            ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
            ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95, subsampling=1)
    return buffer.getvalue()

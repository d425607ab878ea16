"""read_image on real files written here: every DICOM flavour, JPEG/PNG mode, and bad input."""
from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence

from dicom_files import TRANSFER_SYNTAXES, write_dicom
from pylon.data import readers
from pylon.data.readers import ImageReadError, read_image


def scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.rint((values.astype(np.float64) - low) / (high - low) * 255).astype(np.uint8)


def dicom_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window onto 0..255, written out independently."""
    x = x.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 255, y)
    return np.rint(y).astype(np.uint8)


def assert_close(actual: np.ndarray, expected: np.ndarray, max_error: int = 1) -> None:
    assert actual.dtype == np.uint8 and actual.ndim == 2
    assert actual.shape == expected.shape
    error = np.abs(actual.astype(int) - expected.astype(int))
    assert error.max() <= max_error, f"max error {error.max()}"


# ---------------------------------------------------------------- DICOM bit depths and LUTs


def test_8bit_monochrome2_is_returned_unchanged(tmp_path, phantom):
    pixels = phantom()
    path = write_dicom(tmp_path / "a.dcm", pixels, transfer_syntax="explicit-little")
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == pixels.shape
    np.testing.assert_array_equal(image, pixels)


def data_range(values: np.ndarray) -> np.ndarray:
    """A film without a window onto 0..255 by the 0.5th and 99.5th percentiles of its values, as
    a viewer fits the display to the data (written out independently of the reader)."""
    low, high = np.percentile(values.astype(np.float64), [0.5, 99.5])
    return np.rint(np.clip((values.astype(np.float64) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_high_bit_depth_without_window_is_scaled_by_its_data(tmp_path, phantom, bits):
    pixels = phantom(max_value=2**bits - 1, dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", pixels, transfer_syntax="explicit-little", bits_stored=bits)
    image = read_image(path)
    assert_close(image, data_range(pixels))
    assert image.min() == 0 and image.max() == 255


def test_12bit_film_declared_16_bits_is_not_black(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", pixels, transfer_syntax="explicit-little", bits_stored=16)
    image = read_image(path)  # scaled by BitsStored it was 0..16: black
    assert_close(image, data_range(pixels))
    assert image.min() == 0 and image.max() == 255


def test_signed_film_with_rescale_and_no_window_is_not_flat_grey(tmp_path, phantom):
    pixels = phantom(max_value=3000, dtype=np.uint16).astype(np.int16) - 1000
    path = write_dicom(tmp_path / "s.dcm", pixels, transfer_syntax="explicit-little", bits_stored=16,
                       RescaleSlope=1, RescaleIntercept=-1024)
    assert pydicom.dcmread(path).PixelRepresentation == 1
    image = read_image(path)  # scaled by the signed 16-bit range it was 124..135: flat grey
    assert_close(image, data_range(pixels - 1024.0))
    assert image.min() == 0 and image.max() == 255


def test_a_few_extreme_pixels_do_not_set_the_contrast(tmp_path, phantom):
    pixels = phantom(max_value=2000, dtype=np.uint16) + np.uint16(1000)
    pixels[0, :3] = 65535  # a burnt-in marker
    path = write_dicom(tmp_path / "m.dcm", pixels, transfer_syntax="explicit-little", bits_stored=16)
    image = read_image(path)
    assert_close(image, data_range(pixels))
    assert np.median(image) > 50  # scaled by the marker, the film would be near black


def test_flat_film_without_window_is_black(tmp_path):
    path = write_dicom(tmp_path / "f.dcm", np.full((8, 8), 700, np.uint16), transfer_syntax="explicit-little",
                       bits_stored=12)
    np.testing.assert_array_equal(read_image(path), np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("bits,dtype", [(8, np.uint8), (12, np.uint16)])
def test_monochrome1_is_inverted(tmp_path, phantom, bits, dtype):
    pixels = phantom(max_value=2**bits - 1, dtype=dtype)
    mono1 = write_dicom(tmp_path / "m1.dcm", pixels, transfer_syntax="explicit-little",
                        photometric="MONOCHROME1", bits_stored=bits)
    mono2 = write_dicom(tmp_path / "m2.dcm", pixels, transfer_syntax="explicit-little", bits_stored=bits)
    np.testing.assert_array_equal(read_image(mono1), 255 - read_image(mono2))


def test_monochrome1_film_declared_16_bits_is_inverted_over_its_data_or_window(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    plain = write_dicom(tmp_path / "m1.dcm", pixels, transfer_syntax="explicit-little",
                        photometric="MONOCHROME1", bits_stored=16)
    assert_close(read_image(plain), 255 - data_range(pixels))  # scaled by BitsStored it was white
    windowed = write_dicom(tmp_path / "m1w.dcm", pixels, transfer_syntax="explicit-little",
                           photometric="MONOCHROME1", bits_stored=16, WindowCenter=2048, WindowWidth=2048)
    assert_close(read_image(windowed), 255 - dicom_window(pixels, 2048, 2048))


def test_window_center_and_width_are_applied(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", pixels, transfer_syntax="explicit-little", bits_stored=12,
                       WindowCenter=1800, WindowWidth=1200)
    image = read_image(path)
    assert_close(image, dicom_window(pixels, 1800, 1200))
    assert (image[pixels < 1200] == 0).all() and (image[pixels > 2400] == 255).all()


def test_window_on_rescaled_values(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", pixels, transfer_syntax="explicit-little", bits_stored=12,
                       RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2000)
    assert_close(read_image(path), dicom_window(pixels * 2.0 - 1000, 3000, 2000))


def test_rescale_without_window_is_scaled_by_the_rescaled_data(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", pixels, transfer_syntax="explicit-little", bits_stored=12,
                       RescaleSlope=-0.5, RescaleIntercept=-100)
    assert_close(read_image(path), data_range(pixels * -0.5 - 100))  # a negative slope inverts


def test_windowed_film_uses_its_window_not_its_data_range(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", pixels, transfer_syntax="explicit-little", bits_stored=16,
                       WindowCenter=1000, WindowWidth=1000)
    # the window's bounds (500, 1500) map to 0 and 255, wherever the data lies
    assert_close(read_image(path), dicom_window(pixels, 1000, 1000))


def test_voi_lut_sequence_is_applied(tmp_path, phantom):
    pixels = phantom(max_value=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", pixels, transfer_syntax="explicit-little", bits_stored=12)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a gamma curve
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    assert_close(read_image(path), scale(lut[pixels], 0, 65535))


def test_signed_pixels_with_rescale(tmp_path, phantom):
    pixels = (phantom(max_value=3000, dtype=np.uint16).astype(np.int16) - 1024)
    path = write_dicom(tmp_path / "s.dcm", pixels, transfer_syntax="explicit-little", bits_stored=12,
                       RescaleSlope=1, RescaleIntercept=0, WindowCenter=0, WindowWidth=2000)
    assert_close(read_image(path), dicom_window(pixels, 0, 2000))


# ---------------------------------------------------------------- compressed transfer syntaxes


@pytest.mark.parametrize("syntax", ["implicit-little", "rle", "jpeg-ls", "jpeg2000"])
@pytest.mark.parametrize("bits", [8, 12])
def test_lossless_syntaxes_decode_exactly(tmp_path, phantom, syntax, bits):
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = phantom(max_value=2**bits - 1, dtype=dtype)
    path = write_dicom(tmp_path / f"{syntax}.dcm", pixels, transfer_syntax=syntax, bits_stored=bits)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert_close(read_image(path), pixels if bits == 8 else data_range(pixels))


def test_jpeg_baseline_decodes_within_jpeg_tolerance(tmp_path, phantom):
    pixels = phantom(96, 128)
    path = write_dicom(tmp_path / "j.dcm", pixels, transfer_syntax="jpeg-baseline")
    image = read_image(path)
    error = np.abs(image.astype(int) - pixels.astype(int))
    assert image.dtype == np.uint8 and image.shape == pixels.shape
    assert error.mean() < 1.0 and error.max() <= 8


def test_dicom_is_detected_by_content_not_extension(tmp_path, phantom):
    pixels = phantom()
    path = write_dicom(tmp_path / "a.dcm", pixels, transfer_syntax="rle")
    renamed = tmp_path / "radiograph.png"
    shutil.copy(path, renamed)
    np.testing.assert_array_equal(read_image(renamed), pixels)
    no_suffix = tmp_path / "radiograph"
    shutil.copy(path, no_suffix)
    np.testing.assert_array_equal(read_image(no_suffix), pixels)


def test_jpeg_named_dcm_is_read_as_jpeg(tmp_path, phantom):
    pixels = phantom()
    path = tmp_path / "scan.dcm"
    Image.fromarray(pixels).save(path, format="PNG")
    np.testing.assert_array_equal(read_image(path), pixels)


# ---------------------------------------------------------------- JPEG and PNG


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1"])
def test_png_modes_become_grey(tmp_path, phantom, mode):
    pixels = phantom()
    grey = Image.fromarray(pixels)
    image = grey.convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path)
    expected = np.asarray(image.convert("L"))
    result = read_image(path)
    assert result.dtype == np.uint8 and result.shape == pixels.shape
    np.testing.assert_array_equal(result, expected)
    if mode in ("L", "RGB", "RGBA", "LA"):
        np.testing.assert_array_equal(result, pixels)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_become_grey(tmp_path, phantom, mode):
    pixels = phantom()
    path = tmp_path / f"{mode}.jpg"
    Image.fromarray(pixels).convert(mode).save(path, quality=95)
    result = read_image(path)
    assert result.dtype == np.uint8 and result.shape == pixels.shape
    assert np.abs(result.astype(int) - pixels.astype(int)).mean() < 2.0


def test_exif_orientation_is_applied(tmp_path, phantom):
    stored = phantom(275, 388)  # 388 wide, 275 high, as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    result = read_image(path)
    assert result.shape == (388, 275)  # 275 wide, 388 high, as every viewer shows it
    assert np.abs(result.astype(int) - np.rot90(stored, k=-1).astype(int)).mean() < 2.0


def test_transparent_pixels_become_black(tmp_path, phantom):
    rgba = np.dstack([phantom()] * 3 + [np.full(phantom().shape, 255, np.uint8)])
    rgba[:10, :, 3] = 0
    path = tmp_path / "t.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    result = read_image(path)
    assert (result[:10] == 0).all()
    np.testing.assert_array_equal(result[10:], phantom()[10:])


@pytest.mark.parametrize("low,high", [(100, 4195), (0, 65535)])
def test_16bit_png_is_scaled_by_its_range_not_clipped(tmp_path, phantom, low, high):
    pixels = phantom(max_value=high - low, dtype=np.uint16) + np.uint16(low)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I")
    result = read_image(path)
    assert_close(result, scale(pixels, pixels.min(), pixels.max()), max_error=0)
    assert result.min() == 0 and result.max() == 255


def test_flat_16bit_png_is_black(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((8, 8), 700, np.uint16)).save(path)
    np.testing.assert_array_equal(read_image(path), np.zeros((8, 8), np.uint8))


# ---------------------------------------------------------------- bad input


def expect_error(path: Path, *reason_words: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    message = str(caught.value)
    assert str(path) in message
    for word in reason_words:
        assert word.lower() in message.lower(), message
    assert isinstance(caught.value, ValueError)
    return caught.value


def test_missing_file(tmp_path):
    error = expect_error(tmp_path / "nope.dcm", "not found")
    # survives the trip from a DataLoader worker to the main process
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ImageReadError) and str(copy) == str(error) and copy.path == error.path


def test_broken_symlink_is_named_as_such(tmp_path):
    link = tmp_path / "scan.dcm"
    link.symlink_to(tmp_path / "moved" / "scan.dcm")
    expect_error(link, f"broken symbolic link to {tmp_path / 'moved' / 'scan.dcm'}")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpeg"
    path.touch()
    expect_error(path, "empty")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("patient list, not an image\n" * 20)
    expect_error(path, "unknown file format")


def test_unsupported_image_format(tmp_path, phantom):
    path = tmp_path / "scan.tiff"
    Image.fromarray(phantom()).save(path)
    expect_error(path, "unsupported", "TIFF")


def test_garbage_with_dicom_extension(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(bytes(range(256)) * 8)
    expect_error(path, "not a DICOM file")


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_jpeg_and_png(tmp_path, phantom, fmt, suffix):
    full = tmp_path / f"full{suffix}"
    Image.fromarray(phantom(96, 128)).save(full, format=fmt)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    expect_error(cut, "truncated")


@pytest.mark.parametrize("syntax", ["explicit-little", "jpeg-baseline", "rle"])
def test_truncated_dicom(tmp_path, phantom, syntax):
    full = write_dicom(tmp_path / "full.dcm", phantom(96, 128), transfer_syntax=syntax)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size - 2000])
    error = expect_error(cut)
    assert "truncated" in error.reason or "less than expected" in error.reason, error.reason


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "header_only.dcm", None)
    expect_error(path, "no pixel data")


@pytest.mark.parametrize("value", ["", None])
def test_missing_photometric_interpretation_is_named(tmp_path, phantom, value):
    path = write_dicom(tmp_path / "p.dcm", phantom(max_value=4095, dtype=np.uint16), transfer_syntax="explicit-little",
                       bits_stored=12)
    ds = pydicom.dcmread(path)
    if value is None:
        del ds.PhotometricInterpretation
    else:
        ds.PhotometricInterpretation = value
    ds.save_as(path)
    expect_error(path, "PhotometricInterpretation (0028,0004) is missing or empty")


def test_multi_frame_dicom(tmp_path, phantom):
    path = write_dicom(tmp_path / "mf.dcm", np.stack([phantom()] * 3), transfer_syntax="explicit-little")
    expect_error(path, "multi-frame", "3 frames")


@pytest.fixture
def warnings_once(monkeypatch, caplog):
    """The reader's warnings as a list of messages, with its said-once memory fresh."""
    monkeypatch.setattr(readers, "_warned", set())
    caplog.set_level(logging.WARNING, logger="pylon.data.readers")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "pylon.data.readers"]


def test_colour_dicoms_become_their_luminance_and_say_so_once(tmp_path, warnings_once):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, np.arange(24) * 10, 50
    luminance = np.rint(rgb.astype(int) @ [299, 587, 114] / 1000).astype(np.uint8)
    first = write_dicom(tmp_path / "rgb.dcm", rgb, transfer_syntax="explicit-little", photometric="RGB")
    np.testing.assert_array_equal(read_image(first), luminance)
    assert luminance[0, 0] == 66  # 0.299 * 200 + 0.587 * 0 + 0.114 * 50
    ds = pydicom.dcmread(first)  # the same colours stored as YBR_FULL
    ds.PhotometricInterpretation, ds.PixelData = "YBR_FULL", convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.save_as(tmp_path / "ybr.dcm")
    assert_close(read_image(tmp_path / "ybr.dcm"), luminance)
    jpeg = write_dicom(tmp_path / "j.dcm", rgb, transfer_syntax="jpeg-baseline", photometric="RGB")
    assert pydicom.dcmread(jpeg).PhotometricInterpretation == "YBR_FULL_422"
    assert_close(read_image(jpeg), luminance, max_error=2)

    index = (np.arange(16 * 24).reshape(16, 24) % 256).astype(np.uint8)
    entries = {"Red": np.arange(256) * 257, "Green": (255 - np.arange(256)) * 257, "Blue": np.zeros(256)}
    palette = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in entries}
    palette.update({f"{c}PaletteColorLookupTableData": v.astype("<u2").tobytes() for c, v in entries.items()})
    path = write_dicom(tmp_path / "palette.dcm", index, transfer_syntax="explicit-little",
                       photometric="PALETTE COLOR", **palette)
    assert_close(read_image(path), np.rint(0.299 * index + 0.587 * (255 - index)).astype(np.uint8), max_error=0)

    (warning,) = warnings_once()
    assert str(first) in warning and "colour DICOM (RGB) converted to grey" in warning


def test_a_dicom_that_is_not_a_radiograph_is_read_with_one_warning(tmp_path, phantom, warnings_once):
    ct = [write_dicom(tmp_path / f"ct{i}.dcm", phantom(), transfer_syntax="explicit-little", Modality="CT")
          for i in range(2)]
    dx = write_dicom(tmp_path / "dx.dcm", phantom(), transfer_syntax="explicit-little", Modality="DX")
    for path in [*ct, dx]:
        np.testing.assert_array_equal(read_image(path), phantom())
    (warning,) = warnings_once()
    assert str(ct[0]) in warning and "Modality CT is not a radiograph" in warning


def test_malformed_dicom_header_value_is_an_image_read_error(tmp_path):
    # pydicom's own test file: NumberOfFrames holds '1A'
    error = expect_error(Path(get_testdata_file("badVR.dcm")), "not a readable DICOM file", "'1A'")
    assert "\n" not in error.reason


def test_pydicom_logs_nothing_for_files_reported_in_one_line(tmp_path, phantom, caplog):
    full = write_dicom(tmp_path / "full.dcm", phantom(96, 128), transfer_syntax="jpeg-baseline")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[:-2000])
    with caplog.at_level(logging.DEBUG):
        for path in (cut, get_testdata_file("badVR.dcm")):
            with pytest.raises(ImageReadError):
                read_image(path)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")], caplog.text
    assert "Traceback" not in caplog.text


def test_decompression_bomb_is_named_as_such(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 320 pixels > 2 x 100
    expect_error(path, "too large to decode safely (320 pixels; Pillow's limit is 200")


def test_multi_frame_png(tmp_path, phantom):
    path = tmp_path / "animated.png"
    frames = [Image.fromarray(phantom()), Image.fromarray(255 - phantom())]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    expect_error(path, "2 frames")

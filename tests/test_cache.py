"""The image cache: building from real JPEG/PNG files, reuse, invalidation, geometry, atomicity."""
from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_files import write_dicom

from pylon.data import cache as cache_module
from pylon.data.cache import BUILDING_PREFIX, ImageCache, build_cache, cache_key, pixel_mean_std, resize_image
from pylon.data.readers import HEADER_TAGS, read_image
from pylon.data.records import Box, Record

SIZE = 48


def _radiograph(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth grey texture (JPEG-friendly) with a per-image brightness."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 200, size=(h // 8 + 2, w // 8 + 2)).astype(np.float32)
    big = np.kron(coarse, np.ones((8, 8), np.float32))[:h, :w]
    return np.clip(big, 0, 255).astype(np.uint8)


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _record(i: int, path: Path, label: int = 0, boxes=()) -> Record:
    return Record(id=f"img{i}", patient_id=f"p{i}", source="kaggle", path=str(path), label=label,
                  boxes=tuple(Box(*b) for b in boxes))


@pytest.fixture()
def image_folder(tmp_path: Path) -> tuple[list[Record], Path]:
    """Five readable non-square files of several sizes (JPEG, PNG, RGB), one corrupt, one empty."""
    shapes = [(60, 90, "jpg"), (90, 60, "png"), (50, 75, "jpeg"), (64, 64, "png"), (40, 100, "jpg")]
    records = []
    for i, (h, w, ext) in enumerate(shapes):
        array = _radiograph(h, w, seed=i)
        if i == 4:
            array = np.stack([array] * 3, axis=-1)  # an RGB JPEG, like the Kaggle re-saves
        records.append(_record(i, _write(tmp_path / f"img{i}.{ext}", array), label=i % 2))
    corrupt = tmp_path / "corrupt.jpg"
    good_jpeg = (tmp_path / "img0.jpg").read_bytes()
    corrupt.write_bytes(good_jpeg[: len(good_jpeg) // 3])  # truncated JPEG
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    records.insert(2, _record(10, corrupt))
    records.append(_record(11, empty))
    return records, tmp_path / "cache"


def test_build_skips_unreadable_files_and_caches_the_rest(image_folder, caplog):
    records, cache_dir = image_folder
    with caplog.at_level(logging.WARNING, logger="pylon.data.cache"):
        cache = build_cache(records, cache_dir, image_size=SIZE, resize="stretch", workers=2, progress=False)

    assert len(cache) == 5
    assert [r.id for r in cache.records] == ["img0", "img1", "img2", "img3", "img4"]
    assert {u["id"] for u in cache.unreadable} == {"img10", "img11"}
    reasons = {u["id"]: u["reason"] for u in cache.unreadable}
    assert "empty" in reasons["img11"]
    assert reasons["img10"]
    assert "skipped 2 unreadable images" in caplog.text and str(cache.path / "report.csv") in caplog.text

    with open(cache.path / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["id"] for r in rows} == {"img10", "img11"} and all(r["reason"] for r in rows)
    assert {r["path"] for r in rows} == {records[2].path, records[-1].path}

    images = np.load(cache.path / "images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap) and images.shape == (5, SIZE, SIZE) and images.dtype == np.uint8
    for i, record in enumerate(cache.records):
        expected, geometry = resize_image(read_image(record.path), SIZE, "stretch")
        np.testing.assert_array_equal(cache.image(i), expected)
        assert cache.geometry[i] == geometry
    assert cache.records[1].label == 1 and cache.labels.tolist() == [0, 1, 0, 1, 0]


def test_second_build_reuses_the_cache_without_reading_files(image_folder):
    records, cache_dir = image_folder
    first = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    stamp = os.stat(first.path / "images.npy").st_mtime_ns
    cached_pixels = first.image(0)

    # Same size, same mtime, different bytes: only a build that reads files could notice.
    source = Path(records[0].path)
    before = os.stat(source)
    source.write_bytes(b"\0" * before.st_size)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))

    second = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert second.path == first.path
    assert os.stat(second.path / "images.npy").st_mtime_ns == stamp
    np.testing.assert_array_equal(second.image(0), cached_pixels)
    assert len(second.unreadable) == 2


def test_changed_file_or_settings_give_a_new_cache(image_folder):
    records, cache_dir = image_folder
    base = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)

    _write(Path(records[1].path), _radiograph(90, 60, seed=99))
    os.utime(records[1].path, ns=(1, os.stat(records[1].path).st_mtime_ns + 10**9))
    changed = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert changed.path != base.path
    assert not np.array_equal(changed.image(1), base.image(1))
    np.testing.assert_array_equal(changed.image(1), resize_image(read_image(records[1].path), SIZE, "stretch")[0])

    bigger = build_cache(records, cache_dir, image_size=SIZE + 16, workers=1, progress=False)
    assert bigger.path not in (base.path, changed.path) and bigger.images.shape[1:] == (SIZE + 16, SIZE + 16)
    boxed = build_cache(records, cache_dir, image_size=SIZE, resize="letterbox", workers=1, progress=False)
    assert boxed.path not in (base.path, changed.path, bigger.path)


def _bright_square_image(tmp_path: Path, h: int, w: int, box: tuple[int, int, int, int]) -> Record:
    x, y, bw, bh = box
    array = np.full((h, w), 20, np.uint8)
    array[y : y + bh, x : x + bw] = 250
    return _record(0, _write(tmp_path / f"square_{h}x{w}.png", array), label=1, boxes=[box])


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("shape", [(100, 160), (150, 90)])
def test_boxes_follow_the_image_into_the_cache_frame(tmp_path, resize, shape):
    h, w = shape
    box = (50, 30, 30, 40)
    record = _bright_square_image(tmp_path, h, w, box)
    cache = build_cache([record], tmp_path / "cache", image_size=64, resize=resize, workers=1, progress=False)

    (bx, by, bw, bh), = cache.boxes_in_cache_frame(0)
    image = cache.image(0).astype(np.float32)
    ys, xs = np.nonzero(image > 135)  # pixels more than half covered by the square
    assert xs.min() >= bx - 1 and xs.max() + 1 <= bx + bw + 1
    assert ys.min() >= by - 1 and ys.max() + 1 <= by + bh + 1
    inner = image[int(np.ceil(by)) + 1 : int(by + bh) - 1, int(np.ceil(bx)) + 1 : int(bx + bw) - 1]
    assert inner.size and inner.min() > 200

    g = cache.geometry[0]
    if resize == "stretch":
        assert (g.pad_x, g.pad_y) == (0.0, 0.0) and g.scale_x == 64 / w and g.scale_y == 64 / h
    else:
        assert g.scale_x == pytest.approx(g.scale_y, rel=0.02)
        long_side_pad = g.pad_x if w >= h else g.pad_y
        short_side_pad = g.pad_y if w >= h else g.pad_x
        assert long_side_pad == 0 and short_side_pad > 0
        # the padding is black
        band = image[: int(g.pad_y)] if w >= h else image[:, : int(g.pad_x)]
        assert band.size and band.max() == 0


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_to_original_inverts_the_cache_mapping(tmp_path, resize):
    record = _bright_square_image(tmp_path, 90, 140, (60, 20, 30, 30))
    cache = build_cache([record], tmp_path / "cache", image_size=64, resize=resize, workers=1, progress=False)
    points = np.random.default_rng(0).uniform(0, [140, 90], size=(20, 2))
    g = cache.geometry[0]
    in_cache = g.boxes_to_cache(np.hstack([points, np.ones_like(points)]))[:, :2]
    np.testing.assert_allclose(cache.to_original(0, in_cache), points, atol=1e-9)

    # the box's corners land where the box mapping puts them
    (bx, by, bw, bh), = cache.boxes_in_cache_frame(0)
    corners = cache.to_original(0, [[bx, by], [bx + bw, by + bh]])
    np.testing.assert_allclose(corners, [[60, 20], [90, 50]], atol=1e-4)
    # the original's centre lands in the middle of the cache image (padding is whole pixels,
    # so an odd leftover puts it half a pixel off)
    np.testing.assert_allclose(g.boxes_to_cache([[70, 45, 0, 0]])[:, :2], [[32, 32]], atol=0.5)


def test_interrupted_build_leaves_nothing_that_looks_complete(image_folder, monkeypatch):
    records, cache_dir = image_folder
    readable = [r for r in records if r.id not in ("img10", "img11")]
    calls = {"n": 0}
    real_read = cache_module.readers.read_image_with_header

    def read_then_interrupt(path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_read(path)

    monkeypatch.setattr(cache_module.readers, "read_image_with_header", read_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_cache(readable, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert list(cache_dir.iterdir()) == []  # the building folder was removed
    monkeypatch.undo()

    # A leftover building folder (a killed build) holding complete-looking files is ignored.
    cache = build_cache(readable, cache_dir, image_size=SIZE, workers=1, progress=False)
    leftover = cache_dir / f"{BUILDING_PREFIX}{cache.path.name}-1-deadbeef"
    shutil.copytree(cache.path, leftover)
    shutil.rmtree(cache.path)
    rebuilt = build_cache(readable, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert rebuilt.path == cache.path and (rebuilt.path / "meta.json").exists()

    # A folder at the final name without meta.json is a half cache: rebuilt, not used.
    (rebuilt.path / "meta.json").unlink()
    np.save(rebuilt.path / "images.npy", np.zeros((1, SIZE, SIZE), np.uint8))
    again = build_cache(readable, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert again.images.shape == (len(readable), SIZE, SIZE)
    np.testing.assert_array_equal(again.image(0), cache.image(0))


def test_a_cache_the_disk_cannot_hold_is_refused_before_writing(image_folder, monkeypatch):
    records, cache_dir = image_folder
    usage = shutil.disk_usage(cache_dir.parent)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    monkeypatch.setattr(cache_module.readers, "read_image_with_header", lambda path: pytest.fail("an image was read"))
    with pytest.raises(cache_module.CacheWriteError) as err:
        build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    message = str(err.value)
    assert f"not enough free space for the image cache in {cache_dir}: it needs 0.02 GiB, 0.01 GiB are free" in message
    assert "data.cache_dir" in message and "\n" not in message
    assert list(cache_dir.iterdir()) == []


def test_a_failed_cache_write_is_one_line_naming_the_folder(image_folder, monkeypatch):
    import errno

    records, cache_dir = image_folder

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_cache_chunk", disk_full)
    with pytest.raises(cache_module.CacheWriteError,
                       match=f"cannot write the image cache in {cache_dir} \\(No space left on device\\); free space"):
        build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert list(cache_dir.iterdir()) == []


def test_a_malformed_dicom_is_reported_and_skipped(image_folder):
    records, cache_dir = image_folder
    bad = _record(12, Path(get_testdata_file("badVR.dcm")))  # NumberOfFrames is '1A'
    cache = build_cache([records[0], bad], cache_dir, image_size=SIZE, workers=2, progress=False)
    assert [r.id for r in cache.records] == ["img0"]
    with open(cache.path / "report.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["id"] == "img12" and row["path"] == bad.path and "'1A'" in row["reason"]


def test_rows_keep_their_dicom_header_fields_and_complete_gets_them(image_folder, phantom):
    records, cache_dir = image_folder
    dicom = write_dicom(cache_dir.parent / "film.dcm", phantom(40, 30), transfer_syntax="explicit-little",
                        ViewPosition="AP", PatientAge="58", PatientSex="F")
    records = [records[0], _record(20, dicom), records[2]]  # a JPEG, a DICOM, a corrupt JPEG
    seen = []

    def complete(rows, headers, sizes):
        seen.append((headers, sizes))
        return [Record(**{**r.__dict__, "view": h["ViewPosition"] or None}) for r, h in zip(rows, headers)]

    cache = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False, complete=complete)
    no_header = dict.fromkeys(HEADER_TAGS, "")
    assert seen == [([no_header, {**no_header, "ViewPosition": "AP", "PatientAge": "58", "PatientSex": "F"}],
                     [(60, 90), (40, 30)])]  # the unreadable row is not completed
    assert [(r.id, r.view) for r in cache.records] == [("img0", None), ("img20", "AP")]
    reused = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False, complete=complete)
    assert reused.path == cache.path and seen[1] == seen[0] and reused.records == cache.records


def test_an_index_without_header_fields_is_rebuilt_in_place(image_folder):
    records, cache_dir = image_folder
    cache = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    with open(cache.path / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(cache.path / "index.csv", "w", newline="") as handle:  # as caches were written before
        writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if k not in HEADER_TAGS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    rebuilt = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert rebuilt.path == cache.path and list(cache_dir.iterdir()) == [cache.path]
    with open(rebuilt.path / "index.csv", newline="") as handle:
        assert set(HEADER_TAGS) <= set(next(csv.DictReader(handle)))
    np.testing.assert_array_equal(np.asarray(rebuilt.images), np.asarray(cache.images))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe to hold the build")
def test_a_killed_build_leaves_only_a_hidden_folder_that_the_next_build_ignores(image_folder, tmp_path):
    records, cache_dir = image_folder
    fifo = tmp_path / "never_written.png"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that writes nothing: the build reading the file waits forever
    code = ("from pylon.data.cache import build_cache; from pylon.data.records import Record; "
            f"build_cache([Record(str(i), str(i), 'kaggle', {str(fifo)!r}, 0) for i in range(4)], {str(cache_dir)!r}, "
            "image_size=32, workers=1, progress=False)")
    build = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not list(cache_dir.glob(f"{BUILDING_PREFIX}*/images.npy")):  # writing its cache
            assert build.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        build.send_signal(signal.SIGKILL)
        build.wait()
    finally:
        build.kill()
        os.close(writer)
    (stale,) = cache_dir.glob(f"{BUILDING_PREFIX}*")
    cache = build_cache(records[:2], cache_dir, image_size=SIZE, workers=1, progress=False)
    assert len(cache) == 2 and cache.path.parent == cache_dir and stale.exists()  # left alone, never read


def test_pixel_mean_std_matches_numpy(image_folder):
    records, cache_dir = image_folder
    cache = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    rows = [0, 2, 3]
    mean, std = pixel_mean_std(cache, rows, chunk_rows=2)
    data = np.asarray(cache.images[rows], dtype=np.float64) / 255.0
    assert mean == pytest.approx(data.mean(), abs=1e-12)
    assert std == pytest.approx(data.std(), abs=1e-12)
    everything = pixel_mean_std(cache)
    assert everything[0] == pytest.approx(np.asarray(cache.images, np.float64).mean() / 255.0, abs=1e-12)


def test_cache_survives_pickling_without_copying_pixels(image_folder):
    import pickle

    records, cache_dir = image_folder
    cache = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    _ = cache.images  # opened
    blob = pickle.dumps(cache)
    assert len(blob) < cache.images.nbytes  # the memory map is not serialized
    clone: ImageCache = pickle.loads(blob)
    np.testing.assert_array_equal(clone.image(3), cache.image(3))


def test_only_scored_boxes_reach_the_cache_frame(tmp_path):
    record = _bright_square_image(tmp_path, 100, 100, (10, 20, 30, 40))
    record = Record(**{**record.__dict__, "boxes": (Box(10, 20, 30, 40), Box(50, 50, 10, 10, "infiltrate"))})
    cache = build_cache([record], tmp_path / "cache", image_size=50, workers=1, progress=False)
    np.testing.assert_allclose(cache.boxes_in_cache_frame(0), [[5, 10, 15, 20]])
    assert cache.records[0].boxes[1].finding == "infiltrate"  # kept on the record, not scored


def test_key_depends_on_pixels_not_on_labels(image_folder):
    records, cache_dir = image_folder
    relabelled = [Record(**{**r.__dict__, "label": 1 - r.label}) for r in records]
    key = cache_key(records, image_size=SIZE, resize="stretch")
    assert key == cache_key(relabelled, image_size=SIZE, resize="stretch")
    assert key[0] != cache_key(records[::-1], image_size=SIZE, resize="stretch")[0]
    # a reused cache carries the records it was asked for, so new labels are never stale
    first = build_cache(records, cache_dir, image_size=SIZE, workers=1, progress=False)
    second = build_cache(relabelled, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert second.path == first.path
    np.testing.assert_array_equal(second.labels, 1 - first.labels)


def test_real_rsna_dicoms_cache_with_their_boxes(rsna_sample, tmp_path):
    from pylon.data.sources import complete_records, rsna

    records = rsna.index(rsna_sample)
    cache = build_cache(records, tmp_path / "cache", image_size=64, resize="letterbox", workers=1, progress=False,
                        complete=complete_records)
    assert len(cache) == len(records) == 16 and not cache.unreadable
    boxed = [i for i, r in enumerate(cache.records) if r.boxes]
    assert sum(len(cache.records[i].boxes) for i in boxed) == 10
    for i in boxed:
        g = cache.geometry[i]
        assert (g.orig_h, g.orig_w, g.scale_x, g.pad_x) == (1024, 1024, 1 / 16, 0.0)  # square: no padding
        np.testing.assert_allclose(cache.boxes_in_cache_frame(i), np.array(cache.records[i].scored_boxes) / 16,
                                   rtol=1e-6)
        x, y, w, h = cache.boxes_in_cache_frame(i)[0]
        np.testing.assert_allclose(cache.to_original(i, [[x + w / 2, y + h / 2]])[0],
                                   [(x + w / 2) * 16, (y + h / 2) * 16], rtol=1e-6)
    # each row is the reader's image shrunk by area averaging
    first = cache.records[0]
    np.testing.assert_array_equal(cache.image(0), resize_image(read_image(first.path), 64, "letterbox")[0])

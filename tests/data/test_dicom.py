"""DICOM to 8-bit RGB: photometric interpretations, bit depths, rescale and VOI windows, frames,
and the real files pydicom ships (compressed transfer syntaxes included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import oct_bscans, write_dicom, write_dicom_without_pixels
from pydicom.data import get_testdata_file

from retinafm.data.dicom import (
    DicomError,
    dicom_frame_count,
    looks_like_dicom,
    read_dicom_frame,
)
from retinafm.data.io import ImageReadError, read_image


def test_rgb_photograph_is_returned_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "photo.dcm", rgb)
    np.testing.assert_array_equal(read_dicom_frame(path), rgb)
    assert read_image(path).shape == (3, 40, 50)


def test_8bit_monochrome_is_kept_and_replicated(tmp_path):
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    out = read_dicom_frame(write_dicom(tmp_path / "g.dcm", gray))
    assert out.shape == (12, 20, 3) and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(out[..., 0], gray)


def test_16bit_without_window_is_scaled_from_its_own_range(tmp_path):
    values = np.linspace(1000, 3000, 200).astype(np.uint16).reshape(10, 20)  # 12 bits used of 16
    out = read_dicom_frame(write_dicom(tmp_path / "d.dcm", values, bits_stored=12))[..., 0]
    assert out.min() == 0 and out.max() == 255
    expected = np.rint((values - 1000.0) * 255 / 2000.0)
    np.testing.assert_allclose(out, expected, atol=1)


def test_rescale_then_window_then_monochrome1(tmp_path):
    stored = np.array([[0, 100, 200, 300]], dtype=np.uint16).repeat(4, axis=0)
    # Rescale: value = 2 * stored - 100 -> -100, 100, 300, 500; window centre 200 width 400 -> [0, 400]
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=16, RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=200, WindowWidth=400)
    out = read_dicom_frame(path)[0, :, 0]
    np.testing.assert_array_equal(out, [0, 64, 191, 255])  # clip, (100/400)*255, (300/400)*255, clip
    inverted = write_dicom(tmp_path / "m1.dcm", stored.astype(np.uint8), photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_dicom_frame(inverted)[0, :, 0], 255 - stored[0].astype(np.uint8))


def test_multiframe_oct_frames_are_addressed(tmp_path):
    scans = oct_bscans(7)
    path = write_dicom(tmp_path / "oct.dcm", scans)
    assert dicom_frame_count(path) == 7
    for k in (0, 3, 6):
        np.testing.assert_array_equal(read_image(f"{path}#frame={k}")[0].numpy(), scans[k])
    with pytest.raises(ImageReadError, match=r"has 7 frame\(s\); frame 9 does not exist"):
        read_image(f"{path}#frame=9")


def test_dicom_is_recognised_by_content_without_a_suffix(tmp_path):
    path = write_dicom(tmp_path / "IM0001", oct_bscans(1)[0])
    assert looks_like_dicom(path)
    assert read_image(path).shape == (3, 48, 64)


@pytest.mark.parametrize("name,shape", [
    ("SC_rgb_rle_2frame.dcm", (3, 100, 100)),  # RLE, RGB, two frames
    ("examples_ybr_color.dcm", (3, 240, 320)),  # YBR_FULL_422 -> RGB
    ("examples_palette.dcm", (3, 350, 800)),  # PALETTE COLOR
    ("JPEG2000.dcm", (3, 1024, 256)),  # JPEG 2000 (pylibjpeg-openjpeg), signed 16-bit
    ("SC_rgb_jpeg_dcmtk.dcm", (3, 100, 100)),  # baseline JPEG (pylibjpeg-libjpeg)
    ("MR_small.dcm", (3, 64, 64)),  # 16-bit with a VOI window
])
def test_real_files_pydicom_ships(name, shape):
    image = read_image(get_testdata_file(name))
    assert tuple(image.shape) == shape and image.dtype == torch.uint8
    assert int(image.max()) > int(image.min())  # not a blank picture


def test_bad_dicom_gives_a_reason(tmp_path):
    with pytest.raises(ImageReadError, match="without pixel data"):
        read_image(write_dicom_without_pixels(tmp_path / "report.dcm"))
    (tmp_path / "fake.dcm").write_bytes(b"this is not dicom at all" * 10)
    with pytest.raises(ImageReadError, match="not a valid DICOM file"):
        read_image(tmp_path / "fake.dcm")
    with pytest.raises(ImageReadError, match="cannot decode its pixel data"):
        read_image(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(DicomError, match="not a valid DICOM"):
        dicom_frame_count(tmp_path / "fake.dcm")

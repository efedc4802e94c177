"""Heatmap overlays: the blend leaves irrelevant pixels alone, the contour surrounds exactly the top
10 % region, any image size works and mismatched shapes are refused."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from retinafm.data.synthetic import render_fundus
from retinafm.overlays import (
    CONTOUR_COLOUR,
    EDGE_COLOUR,
    contour_rings,
    line_width,
    render_overlay,
    top_region,
    write_overlay,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    # Mid-grey noise that never equals the contour's white or its dark edge.
    return np.random.default_rng(seed).integers(60, 200, (h, w, 3), dtype=np.uint8)


def _blob_heatmap(h: int = 100, w: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A heatmap of 0.2 over the middle 60 × 60 and 1.0 on a 19 × 19 square within it (361 of the
    3600 positive pixels, ~10 %: the top region is exactly that square)."""
    heatmap = np.zeros((h, w), np.float32)
    heatmap[20:80, 20:80] = 0.2
    heatmap[30:49, 40:59] = 1.0
    square = np.zeros((h, w), bool)
    square[30:49, 40:59] = True
    return heatmap, square


def test_shapes_and_dtype():
    image = _image(40, 64)
    heatmap = np.linspace(0, 1, 40 * 64, dtype=np.float32).reshape(40, 64)
    out = render_overlay(image, heatmap)
    assert out.shape == (40, 64, 3) and out.dtype == np.uint8
    assert not np.shares_memory(out, image)


def test_all_zero_heatmap_leaves_the_image_unchanged():
    image = _image(33, 47)
    out = render_overlay(image, np.zeros((33, 47), np.float32))
    np.testing.assert_array_equal(out, image)


def test_contour_surrounds_exactly_the_top_region():
    image = _image(100, 100)
    heatmap, square = _blob_heatmap()
    np.testing.assert_array_equal(top_region(heatmap), square)
    out = render_overlay(image, heatmap)
    width = line_width(heatmap.shape)
    assert width == 1  # 0.4 % of 100 px, at least 1
    ring = ndimage.binary_dilation(square, structure=np.ones((3, 3), bool), iterations=width) & ~square
    white = (out == CONTOUR_COLOUR).all(axis=2)
    np.testing.assert_array_equal(white, ring)  # the white line: the pixels touching the square, and no others
    dark = (out == EDGE_COLOUR).all(axis=2)
    outer = ndimage.binary_dilation(square, structure=np.ones((3, 3), bool), iterations=width + 1) & ~square & ~ring
    np.testing.assert_array_equal(dark, outer)  # its dark edge lies just outside it
    assert not (white | dark)[square].any()  # the region itself keeps its colours


def test_colour_where_relevant_image_where_not():
    image = _image(100, 100)
    heatmap, square = _blob_heatmap()
    out = render_overlay(image, heatmap).astype(int)
    far = heatmap == 0
    np.testing.assert_array_equal(out[far], image[far])  # not looked at: exactly the image
    inside = square.copy()
    inside[30, :] = inside[48, :] = inside[:, 40] = inside[:, 58] = False  # away from the contour
    difference = np.abs(out[inside] - image[inside].astype(int)).sum(axis=1)
    assert (difference > 30).all()  # where the heatmap is 1 the colour shows


def test_weak_relevance_barely_tints():
    image = _image(20, 20)
    out = render_overlay(image, np.full((20, 20), 0.02, np.float32), top=1.0)  # every pixel in the "top" region
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 0.45 * 0.04 * 255 + 1


@pytest.mark.parametrize("shape", [(2, 2), (2, 9), (3, 8000), (7000, 2), (37, 250)])
def test_any_size(shape):
    image = _image(*shape)
    heatmap = np.random.default_rng(1).random(shape).astype(np.float32)
    out = render_overlay(image, heatmap)
    assert out.shape == (*shape, 3)
    assert (out == CONTOUR_COLOUR).all(axis=2).any() or shape == (2, 2)


def test_line_width_scales_with_the_shorter_side():
    assert line_width((2, 8000)) == 1
    assert line_width((224, 224)) == 1
    assert line_width((1000, 1500)) == 4
    assert line_width((8000, 6000)) == 24
    ring, edge = contour_rings(np.pad(np.ones((10, 10), bool), 20), 4)
    assert ring.sum() == 18 * 18 - 100 and edge.sum() == 22 * 22 - 18 * 18


def test_grey_image_and_nan_heatmap():
    grey = np.full((16, 16), 100, np.uint8)
    heatmap = np.zeros((16, 16), np.float32)
    heatmap[4:8, 4:8] = np.nan
    heatmap[8:12, 8:12] = 1.0
    out = render_overlay(grey, heatmap)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[5, 5], [100, 100, 100])  # NaN: not relevant


@pytest.mark.parametrize(("image", "heatmap", "message"), [
    (np.zeros((10, 12, 3), np.uint8), np.zeros((12, 10)), r"heatmap is 12×10 \(H×W\) but the image is 10×12"),
    (np.zeros((10, 12, 3), np.uint8), np.zeros((1, 10, 12)), "heatmap must be"),
    (np.zeros((10, 12, 3), np.float32), np.zeros((10, 12)), "must be uint8"),
    (np.zeros((10, 12, 4), np.uint8), np.zeros((10, 12)), r"\(H, W, 3\)"),
])
def test_mismatch_errors(image, heatmap, message):
    with pytest.raises(ValueError, match=message):
        render_overlay(image, heatmap)


def test_bad_cmap():
    with pytest.raises(ValueError, match="not a matplotlib colour map"):
        render_overlay(_image(8, 8), np.ones((8, 8)), cmap="rainbow-unicorn")


def test_write_overlay_on_a_synthetic_fundus(tmp_path):
    fundus = render_fundus(np.random.default_rng(0), "diabetic_retinopathy", size=96)
    yy, xx = np.mgrid[0:96, 0:96]
    heatmap = np.exp(-(((xx - 60) / 10.0) ** 2 + ((yy - 40) / 8.0) ** 2)).astype(np.float32)
    path = write_overlay(tmp_path / "overlays" / "a__diabetic_retinopathy.png", fundus, heatmap)
    assert path == tmp_path / "overlays" / "a__diabetic_retinopathy.png"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    with Image.open(path) as written:
        assert written.format == "PNG" and written.mode == "RGB" and written.size == (96, 96)
        np.testing.assert_array_equal(np.asarray(written), render_overlay(fundus, heatmap))

"""Decoding: every common mode becomes RGB uint8; bad files give a reason, never a crash."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinafm.data.io import ImageReadError, is_image_file, read_image


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_png_and_jpeg_are_rgb_chw_uint8(tmp_path, rgb):
    png = read_image(_save(Image.fromarray(rgb), tmp_path / "a.png"))
    assert png.dtype == torch.uint8 and png.shape == (3, 20, 30)
    np.testing.assert_array_equal(png.permute(1, 2, 0).numpy(), rgb)
    jpg = read_image(_save(Image.fromarray(rgb), tmp_path / "a.jpg", quality=95))
    assert jpg.shape == (3, 20, 30)
    # The fast JPEG decoder agrees with PIL's.
    ref = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")).astype(int)
    assert np.abs(jpg.permute(1, 2, 0).numpy().astype(int) - ref).mean() < 2


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "I", "F"])
def test_modes_become_rgb(tmp_path, rgb, mode):
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 200)
    elif mode in ("I", "F"):
        img = Image.fromarray(rgb[..., 0].astype(np.int32 if mode == "I" else np.float32) * 3)
    else:
        img = img.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".tif" if mode in ("I;16", "I", "F") else ".png"
    out = read_image(_save(img, tmp_path / f"x{suffix}"))
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 30)
    if mode in ("L", "I;16", "I", "F"):
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    if mode in ("I;16", "I", "F"):  # scaled by its own range, not divided into darkness
        assert int(out.max()) == 255 and int(out.min()) == 0


def test_transparent_areas_become_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 3, 0].tolist() == [0, 0, 0]


def test_bmp_gif_and_webp(tmp_path, rgb):
    for suffix in (".bmp", ".gif", ".webp"):
        assert read_image(_save(Image.fromarray(rgb), tmp_path / f"x{suffix}")).shape == (3, 20, 30)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.png", b"", "empty file"),
        ("text.png", b"this is not an image at all", "not a recognised image format"),
        ("cut.jpg", None, "corrupt or truncated"),
        ("cut.png", None, "corrupt or truncated"),
    ],
)
def test_bad_files_give_reasons(tmp_path, rgb, name, content, reason):
    path = tmp_path / name
    if content is None:
        full = tmp_path / f"full{Path(name).suffix}"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(full)
        content = full.read_bytes()[: len(full.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert info.value.path == str(path)


def test_missing_tiny_and_huge(tmp_path, monkeypatch):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="1x1 pixels"):
        read_image(_save(Image.new("RGB", (1, 1)), tmp_path / "one.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb, scaled down
    with pytest.raises(ImageReadError, match="too large"):
        read_image(_save(Image.new("L", (100, 100)), tmp_path / "bomb.png"))


def test_is_image_file():
    assert is_image_file(Path("a/b.JPG")) and is_image_file(Path("x.tiff"))
    assert not is_image_file(Path("notes.txt")) and not is_image_file(Path(".hidden.png"))


def test_large_jpeg_decodes_at_a_reduced_scale_never_below_the_size_asked(tmp_path):
    from retinafm.data.synthetic import render_fundus

    photo = render_fundus(np.random.default_rng(0), "glaucoma", size=1200)
    Image.fromarray(photo).save(tmp_path / "big.jpg", quality=92)
    full = read_image(tmp_path / "big.jpg")
    small = read_image(tmp_path / "big.jpg", decode_size=256)
    assert tuple(full.shape) == (3, 1200, 1200) and tuple(small.shape) == (3, 300, 300)  # 1/4 scale >= 256
    reference = torch.nn.functional.interpolate(full[None].float(), size=(300, 300), mode="area")[0]
    assert (small.float() - reference).abs().mean() < 3.0  # the same picture, smaller
    assert tuple(read_image(tmp_path / "big.jpg", decode_size=700).shape) == (3, 1200, 1200)  # < 2x: full decode
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert tuple(read_image(tmp_path / "cmyk.jpg", decode_size=256).shape) == (3, 1200, 1200)  # full-decode path


def test_recipes_ask_for_the_resolution_they_need():
    from retinafm.data.loader import ImageDataset
    from retinafm.data.transforms import (
        AugmentSettings,
        Preprocessing,
        eval_transform,
        train_transform,
    )

    mean, std = (0.5,) * 3, (0.25,) * 3
    assert eval_transform(224, mean, std).decode_size == 256
    assert eval_transform(224, mean, std, preprocessing=Preprocessing(fundus_crop=True)).decode_size == 384
    assert train_transform(224, mean, std, AugmentSettings(crop_min_scale=0.25)).decode_size == 448
    assert ImageDataset(["a.jpg"], [None], eval_transform(224, mean, std)).decode_size == 256


def test_reduced_scale_decode_applies_the_camera_orientation(tmp_path):
    photo = np.zeros((800, 1200, 3), np.uint8)
    photo[:, :600] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(photo).save(tmp_path / "rotated.jpg", exif=exif)
    full = read_image(tmp_path / "rotated.jpg")
    small = read_image(tmp_path / "rotated.jpg", decode_size=200)
    assert tuple(full.shape) == (3, 1200, 800) and tuple(small.shape) == (3, 300, 200)
    assert full[:, :600].float().mean() > 200 and small[:, :150].float().mean() > 200  # white on top after turning

"""Field-of-view crop, OCT centre crop and the modality guard, on scikit-image's real fundus photograph."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from torchvision.io import decode_jpeg, encode_jpeg

from retinafm.data.preprocess import (
    COLOUR_MIN,
    GRAY_MAX,
    center_crop_fraction,
    fov_box,
    fundus_crop,
    guess_modality,
    image_statistics,
    modality_warning,
)

TOL = 5  # pixels: the mask is estimated on a ~4x downscaled copy
PAD = dict(top=120, left=200, bottom=60, right=150)


@pytest.fixture(scope="module")
def retina() -> torch.Tensor:
    return torch.from_numpy(skdata.retina()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def disc_box(retina) -> tuple[int, int, int, int]:
    """Where the disc of the original photograph is (max channel above 35 of 255)."""
    rows, cols = np.nonzero(retina.amax(0).numpy() > 35)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def on_canvas(image: torch.Tensor, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    c, h, w = image.shape
    out = torch.zeros((c, top + h + bottom, left + w + right), dtype=torch.uint8)
    out[:, top:top + h, left:left + w] = image
    return out


@pytest.fixture(scope="module")
def padded(retina) -> torch.Tensor:
    return on_canvas(retina, **PAD)


@pytest.fixture(scope="module")
def expected_box(disc_box) -> tuple[int, int, int, int]:
    top, left, bottom, right = disc_box
    return top + PAD["top"], left + PAD["left"], bottom + PAD["top"], right + PAD["left"]


def assert_box_close(box, expected, tol: int = TOL) -> None:
    assert box is not None
    assert all(abs(a - b) <= tol for a, b in zip(box, expected, strict=True)), (box, expected)


def darken(image: torch.Tensor, factor: float = 0.35) -> torch.Tensor:
    return (image.float() * factor).round().to(torch.uint8)


def with_border_noise(image: torch.Tensor, high: int = 12, block: int = 1, seed: int = 0) -> torch.Tensor:
    """Replace the black surround by noise in 0..high, constant over block x block tiles (JPEG-like)."""
    c, h, w = image.shape
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, high + 1, (c, math.ceil(h / block), math.ceil(w / block)), generator=g, dtype=torch.uint8)
    noise = tiles.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w]
    border = image.amax(0, keepdim=True) < 5
    return torch.where(border, noise, image)


def with_notch(image: torch.Tensor, box, angle_deg: float, half_width_deg: float = 5, depth: int = 80) -> torch.Tensor:
    """Black out a wedge at the circle's edge, at `angle_deg` (0 = right, 90 = up)."""
    top, left, bottom, right = box
    cy, cx, radius = (top + bottom) / 2, (left + right) / 2, (right - left) / 2
    yy, xx = np.mgrid[: image.shape[1], : image.shape[2]]
    dist = np.hypot(yy - cy, xx - cx)
    angle = np.degrees(np.arctan2(cy - yy, xx - cx))
    delta = (angle - angle_deg + 180) % 360 - 180
    wedge = (np.abs(delta) <= half_width_deg) & (dist > radius - depth)
    out = image.clone()
    out[:, torch.from_numpy(wedge)] = 0
    assert int(torch.from_numpy(wedge).sum()) > 500  # the notch really cuts into the disc
    return out


def content_rows(image: torch.Tensor, level: int = 20) -> np.ndarray:
    return np.flatnonzero(image.amax(0).amax(1).numpy() > level)


def content_cols(image: torch.Tensor, level: int = 20) -> np.ndarray:
    return np.flatnonzero(image.amax(0).amax(0).numpy() > level)


# --- fundus_crop / fov_box ---------------------------------------------------------------------


def test_original_photograph_crops_to_its_disc(retina, disc_box):
    assert_box_close(fov_box(retina), disc_box)
    out = fundus_crop(retina)
    assert out.dtype == torch.uint8 and out.shape[0] == 3 and out.shape[1] == out.shape[2]


def test_padded_disc_is_found_and_cropped_square(padded, expected_box, disc_box):
    assert_box_close(fov_box(padded), expected_box)
    out = fundus_crop(padded)
    disc_size = max(disc_box[2] - disc_box[0], disc_box[3] - disc_box[1])
    assert out.dtype == torch.uint8 and out.shape[0] == 3 and out.shape[1] == out.shape[2]
    assert abs(out.shape[1] - disc_size) <= 0.02 * disc_size
    # The disc fills the square: only a sliver of black is left on each side.
    rows, cols = content_rows(out), content_cols(out)
    assert rows[0] <= TOL and cols[0] <= TOL
    assert out.shape[1] - 1 - rows[-1] <= TOL and out.shape[2] - 1 - cols[-1] <= TOL


def test_darkened_photograph_gives_the_same_box(padded, expected_box):
    assert_box_close(fov_box(darken(padded)), expected_box)
    assert_box_close(fov_box(darken(padded, 0.2)), expected_box)


@pytest.mark.parametrize("angle", [90, 180, 30, -60])
def test_notched_mask_gives_nearly_the_same_box(padded, expected_box, angle):
    notched = with_notch(padded, expected_box, angle_deg=angle)
    assert_box_close(fov_box(notched), expected_box)


@pytest.mark.parametrize(("factor", "high"), [(1.0, 12), (0.35, 12), (0.2, 15)])
@pytest.mark.parametrize("block", [1, 8])
def test_noisy_border_is_still_background(padded, expected_box, block, factor, high):
    image = with_border_noise(darken(padded, factor) if factor != 1.0 else padded, high=high, block=block)
    assert_box_close(fov_box(image), expected_box)
    out = fundus_crop(image)
    assert out.shape[1] == out.shape[2]


def test_circle_cut_at_top_and_bottom_keeps_full_width(padded, expected_box):
    top, left, bottom, right = expected_box
    cut = padded[:, top + 300:top + 1100]  # symmetric cut: 300 rows off each end of the disc
    box = fov_box(cut)
    assert_box_close(box, (0, left, cut.shape[1], right))
    out = fundus_crop(cut)
    width = right - left
    assert out.shape[1] == out.shape[2] and abs(out.shape[2] - width) <= TOL
    rows, cols = content_rows(out), content_cols(out)
    assert cols[0] <= TOL and out.shape[2] - 1 - cols[-1] <= TOL  # full width kept
    assert len(rows) == cut.shape[1]  # every row kept, black added above and below
    assert abs(rows[0] - (out.shape[1] - cut.shape[1]) / 2) <= TOL


def test_asymmetric_cut_keeps_the_circle_centred(padded, expected_box):
    top, left, bottom, right = expected_box
    cut = padded[:, top + 100:top + 1100]  # more of the disc kept below its centre than above
    out = fundus_crop(cut)
    side = out.shape[1]
    centre_in_cut = (bottom - top) / 2 - 100
    rows = content_rows(out)
    assert abs(rows[0] - (side / 2 - centre_in_cut)) <= TOL
    assert len(rows) == cut.shape[1]


def test_image_without_black_border_is_not_cropped(retina):
    inside = retina[:, 300:1100, 250:1250]  # 800 x 1000 from the middle of the retina
    assert fov_box(inside) == (0, 0, 800, 1000)
    out = fundus_crop(inside)
    assert out.shape == (3, 1000, 1000)
    assert torch.equal(out[:, 100:900], inside)  # padded, nothing cut
    square = retina[:, 400:1000, 400:1000].contiguous()
    assert torch.equal(fundus_crop(square), square)


@pytest.mark.parametrize(
    "image",
    [
        torch.zeros((3, 100, 120), dtype=torch.uint8),
        torch.full((3, 100, 120), 128, dtype=torch.uint8),
        (torch.full((3, 90, 70), 128) + torch.randint(-3, 4, (3, 90, 70), generator=torch.Generator().manual_seed(1)))
        .to(torch.uint8),
        torch.randint(0, 13, (3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8),
        torch.zeros((3, 2, 2), dtype=torch.uint8),
    ],
    ids=["black", "grey", "grey-noise", "black-noise", "tiny"],
)
def test_featureless_images_come_back_unchanged(image):
    assert fov_box(image) is None
    out = fundus_crop(image)
    assert torch.equal(out, image)


def test_tiny_and_odd_images_never_raise():
    for image in (torch.zeros((3, 1, 1), dtype=torch.uint8), torch.zeros((3, 0, 4), dtype=torch.uint8),
                  torch.full((3, 5, 300), 200, dtype=torch.uint8), torch.full((1, 40, 40), 9, dtype=torch.uint8),
                  torch.randint(0, 256, (3, 3, 3000), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)):
        out = fundus_crop(image)
        assert out.dtype == torch.uint8 and out.numel() >= image.numel()


def test_bad_inputs_are_rejected_clearly(retina):
    with pytest.raises(TypeError, match="uint8"):
        fundus_crop(retina.float())
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        fov_box(retina[0])


def test_deep_notch_does_not_shift_the_circle_in_the_square(padded, expected_box, disc_box):
    notched = with_notch(padded, expected_box, angle_deg=90, half_width_deg=12, depth=120)
    out = fundus_crop(notched)
    disc_size = disc_box[2] - disc_box[0]
    assert abs(out.shape[1] - disc_size) <= TOL
    # Placed by the circle's centre, not the notched box's: the bottom of the disc meets the edge.
    assert out.shape[1] - 1 - content_rows(out)[-1] <= TOL


def test_burnt_in_text_in_the_border_is_ignored(padded, expected_box):
    labelled = padded.clone()
    labelled[:, 20:60, 20:400] = 255  # a white label in the top-left corner
    labelled[:, 1540:1580, 1300:1700] = 255  # and one in the bottom-right
    assert_box_close(fov_box(labelled), expected_box)


# --- center_crop_fraction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fraction", "expected"),
    [((3, 496, 768), 0.5, (3, 248, 384)), ((3, 496, 768), 1.0, (3, 496, 768)), ((3, 10, 11), 0.3, (3, 3, 3)),
     ((3, 8, 8), 1e-6, (3, 1, 1)), ((496, 512), 0.75, (372, 384))],
)
def test_center_crop_fraction_shapes(shape, fraction, expected):
    image = torch.arange(math.prod(shape)).reshape(shape)
    out = center_crop_fraction(image, fraction)
    assert tuple(out.shape) == expected


def test_center_crop_fraction_keeps_the_centre():
    image = torch.arange(3 * 100 * 200, dtype=torch.int64).reshape(3, 100, 200)
    out = center_crop_fraction(image, 0.5)
    assert torch.equal(out, image[:, 25:75, 50:150])


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_center_crop_fraction_rejects_out_of_range(fraction):
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        center_crop_fraction(torch.zeros((3, 10, 10), dtype=torch.uint8), fraction)


# --- modality guard ----------------------------------------------------------------------------


def oct_like(height: int = 496, width: int = 768, seed: int = 0) -> torch.Tensor:
    """Speckled horizontal bands on black, the same value in all three channels."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    bands = sum(torch.exp(-((rows - c) / 6) ** 2) * a for c, a in [(180, 200), (220, 120), (260, 160), (300, 90)])
    speckle = -torch.log(torch.rand((height, width), generator=g).clamp_min(1e-6))  # exponential, like OCT speckle
    gray = (bands * speckle * 0.8 + 5).clamp(0, 255).to(torch.uint8)
    return gray.expand(3, height, width).contiguous()


def jpeg_roundtrip(image: torch.Tensor, quality: int = 75) -> torch.Tensor:
    return decode_jpeg(encode_jpeg(image, quality=quality))


def test_fundus_photograph_is_colour(retina, padded):
    stats = image_statistics(retina)
    assert stats["colourfulness"] >= COLOUR_MIN and 0 <= stats["colourfulness"] <= 1
    assert stats["aspect"] == pytest.approx(1.0)
    assert image_statistics(padded)["aspect"] == pytest.approx(padded.shape[2] / padded.shape[1])
    variants = [retina, padded, darken(padded), jpeg_roundtrip(retina)]
    assert guess_modality([image_statistics(x) for x in variants]) == "CFP"


def test_grayscale_oct_is_oct():
    scans = [oct_like(seed=s) for s in range(3)] + [jpeg_roundtrip(oct_like(seed=3))]
    stats = [image_statistics(x) for x in scans]
    assert stats[0]["colourfulness"] == 0.0
    assert all(s["colourfulness"] <= GRAY_MAX for s in stats)
    assert stats[0]["aspect"] == pytest.approx(768 / 496)
    assert guess_modality(stats) == "OCT"


def test_undecided_sets_are_unknown(retina):
    colour, gray = image_statistics(retina), image_statistics(oct_like())
    black = image_statistics(torch.zeros((3, 50, 50), dtype=torch.uint8))
    assert guess_modality([]) == "unknown"
    assert guess_modality([black, black]) == "unknown"
    assert guess_modality([colour, gray]) == "unknown"
    assert guess_modality([colour] * 9 + [gray]) == "CFP"
    assert guess_modality([colour] * 4 + [black] * 5) == "CFP"  # black frames are not counted


def test_modality_warning_on_mismatch_only():
    message = modality_warning("CFP", "OCT", "RETFound_mae_natureCFP")
    assert message is not None and "\n" not in message
    assert "RETFound_mae_natureCFP" in message and "OCT" in message and "--modality CFP|OCT" in message
    reverse = modality_warning("oct", "CFP", "RETFound_mae_natureOCT")
    assert reverse is not None and "RETFound_mae_natureOCT" in reverse and "--modality CFP|OCT" in reverse
    assert modality_warning("CFP", "CFP", "m") is None
    assert modality_warning("OCT", "OCT", "m") is None
    assert modality_warning("any", "OCT", "m") is None
    assert modality_warning("any", "CFP", "m") is None
    assert modality_warning("CFP", "unknown", "m") is None
    assert modality_warning("OCT", "unknown", "m") is None


def test_check_modality_warns_on_a_mismatch_and_respects_the_declared_modality(tmp_path):
    import warnings

    from PIL import Image

    from retinafm.data.preprocess import check_modality

    rng = np.random.default_rng(0)
    scans = []
    for i in range(4):
        path = tmp_path / f"bscan{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(path)
        scans.append(str(path))
    photo = tmp_path / "retina.png"
    Image.fromarray(skdata.retina()[::8, ::8]).save(photo)
    with pytest.warns(UserWarning, match="expects colour fundus photographs .* look like grayscale OCT"):
        assert check_modality(scans, "CFP", "RETFound_mae_natureCFP") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_modality([str(photo)], "CFP", "RETFound_mae_natureCFP") is None
        assert check_modality(scans, "OCT", "RETFound_mae_natureOCT") is None
        assert check_modality(scans, "any", "dinov2_vitl14") is None
        assert check_modality(scans, "CFP", "RETFound_mae_natureCFP", declared="CFP") is None  # the user knows
        assert check_modality([str(tmp_path / "missing.png")], "CFP", "m") is None  # unreadable: no guess
    with pytest.warns(UserWarning, match="--modality OCT says these are grayscale OCT B-scans"):
        check_modality([str(photo)], "CFP", "RETFound_mae_natureCFP", declared="OCT")

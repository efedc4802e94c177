"""Field-of-view cropping and a modality guard for retinal images.

RETFound and AutoMorph feed models the fundus field of view (FOV) only: the camera's black
surround is cropped away and the disc padded to a black square, so the retina fills the frame at
the same scale whatever camera or frame shape took it. `fundus_crop` is that AutoMorph-style
crop; `center_crop_fraction` is the OCT counterpart (keep the central part of a B-scan). The
guard (`image_statistics`, `guess_modality`, `modality_warning`) catches the common mistake of
feeding OCT B-scans to a fundus model, or fundus photographs to an OCT model.

Everything here is a pure function of (C, H, W) uint8 RGB tensors as returned by
`retinafm.data.io.read_image`, cheap enough to run per image inside DataLoader workers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# --- field of view ---------------------------------------------------------------------------
# The mask is estimated on a block-averaged copy about this many pixels on its longer side:
# the box is then exact to one block (~4 px of a 2000 px image) and labelling stays ~1 ms.
_MASK_SIDE = 512
# Below this spread between the dark (1st percentile) and bright (95th percentile) levels, out
# of 255, no disc is visible: the image is treated as uniform and left alone.
_MIN_CONTRAST = 16.0
# A black border is darker than this fraction of the retina level (95th percentile); when the
# darkest 1% of the image is brighter than that there is no border and nothing is cropped.
_MAX_BORDER_LEVEL = 0.5
# The FOV threshold sits at least this far above the background level, clear of the JPEG noise
# (values ~5-15) that fills the "black" border of many fundus photographs...
_NOISE_MARGIN = 8.0
# ...and 15% of the way from the background to the retina level: relative, so that under-exposed
# images still separate, and low, so that a dim periphery of the disc stays inside the FOV.
_RELATIVE_THRESHOLD = 0.15
# A bright region smaller than this fraction of the frame is a label or noise, not a fundus FOV.
_MIN_FOV_FRACTION = 0.05
# Frame corners whose median is below 30% of the way from the background to the retina level
# are border, and the threshold may rise above their noise, up to that level but no further.
_NOISE_CEILING = 0.3
# Corner patches this fraction of each side sample the border's noise (outside any inscribed circle).
_CORNER = 0.08
# Rows (columns) of the mask at least this wide straddle the circle's centre; their mean locates
# it even when the circle is cut off by the frame or notched (AutoMorph does the same).
_CENTRE_WIDTH = 0.98

# --- modality guard --------------------------------------------------------------------------
_STATS_SIDE = 128  # a strided ~128 px copy is plenty for a whole-image mean
# Pixels darker than this (of 255) carry no reliable hue (black borders, JPEG noise): ignored.
_DARK_LEVEL = 24
# Colourfulness = mean(max - min) / mean(max) over the non-dark pixels: a brightness-weighted
# HSV saturation, so under-exposed photographs score like well-exposed ones.
# Fundus photographs score ~0.5-0.9 (red-dominant retina, almost no blue): colour above this.
COLOUR_MIN = 0.20
# Grayscale replicated to RGB scores 0; JPEG chroma noise and thin coloured overlay lines on OCT
# exports stay below ~0.05: grayscale below this. In between the image is undecided.
GRAY_MAX = 0.08
# At least this share of the decided images must agree before a folder gets a modality; a
# mixed folder stays "unknown" rather than triggering a wrong warning.
MAJORITY = 0.8
# Images with fewer non-dark pixels than this share (all-black frames) are not counted.
_MIN_BRIGHT_FRACTION = 0.01


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a (C, H, W) image tensor, got {shape}")
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")


def _value_small(image: torch.Tensor) -> tuple[np.ndarray, int]:
    """Max over channels, block-averaged to about _MASK_SIDE px; returns (small, block size)."""
    _, h, w = image.shape
    # Max over channels (HSV value): the disc is bright in at least one channel whatever the
    # colour cast (red-dominant, red-free, tinted), and the black border is dark in all of them.
    value = image.amax(dim=0)
    step = max(1, math.ceil(max(h, w) / _MASK_SIDE))
    if min(h, w) < step:
        return np.zeros((0, 0), np.float32), step  # a sliver thinner than one block: no disc
    if step >= 4:
        # Averaging every other pixel of each block is as good against noise and twice as cheap.
        pool = math.ceil(step / 2)
        step = 2 * pool
        small = F.avg_pool2d(value[::2, ::2][None, None].float(), pool)[0, 0]
    elif step > 1:
        small = F.avg_pool2d(value[None, None].float(), step)[0, 0]
    else:
        small = value.float()
    return small.numpy(), step


def _corner_noise(small: np.ndarray, level: float) -> float | None:
    """High end (95th percentile) of the frame's corners darker than `level`; None if none is.

    Corner patches of 8% of each side lie outside any circle inscribed in the frame. The lower
    median over the dark corners ignores one corner with burnt-in text.
    """
    sh, sw = small.shape
    ph, pw = max(2, round(_CORNER * sh)), max(2, round(_CORNER * sw))
    if 2 * ph > sh or 2 * pw > sw:
        return None
    patches = [small[:ph, :pw], small[:ph, -pw:], small[-ph:, :pw], small[-ph:, -pw:]]
    highs = sorted(float(np.percentile(p, 95)) for p in patches if np.median(p) < level)
    return highs[(len(highs) - 1) // 2] if highs else None


def _widest(mask: np.ndarray, rows: np.ndarray) -> float:
    """Mean index of the rows of `mask` whose extent (first to last pixel) is near the widest."""
    sub = mask[rows]
    # Extent, not pixel count: holes (dark vessels, a dim macula) must not move the centre.
    extent = sub.shape[1] - sub[:, ::-1].argmax(axis=1) - sub.argmax(axis=1)
    return float(rows[extent >= _CENTRE_WIDTH * extent.max()].mean())


def _detect_fov(image: torch.Tensor) -> tuple[tuple[int, int, int, int], tuple[float, float]] | None:
    """(top, left, bottom, right) of the FOV and its centre (row, col) in full-res pixels."""
    from scipy import ndimage as ndi  # here: seconds of import that only a fundus crop needs

    _, h, w = image.shape
    if h == 0 or w == 0:
        return None
    small, step = _value_small(image)
    if small.size == 0:
        return None
    dark, bright = np.percentile(small, [1, 95])
    if bright - dark < _MIN_CONTRAST:
        return None  # all black, uniform grey, or noise: nothing to find
    if dark > _MAX_BORDER_LEVEL * bright:
        return (0, 0, h, w), (h / 2, w / 2)  # not even the darkest 1% is black: no border at all
    threshold = dark + max(_NOISE_MARGIN, _RELATIVE_THRESHOLD * (bright - dark))
    ceiling = dark + _NOISE_CEILING * (bright - dark)
    noise = _corner_noise(small, ceiling)
    if noise is not None:
        # Strong noise in a dim photograph's border: clear it too, but never climb into the retina.
        threshold = min(max(threshold, noise + _NOISE_MARGIN / 2), ceiling)
    mask = (small > threshold).view(np.uint8)
    # An opening drops isolated noise blocks and detaches thin burnt-in text from the disc.
    mask = ndi.maximum_filter(ndi.minimum_filter(mask, 3), 3)
    labels, count = ndi.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    biggest = int(sizes.argmax())
    if sizes[biggest] < _MIN_FOV_FRACTION * mask.size:
        return None
    fov = labels == biggest
    rows = np.flatnonzero(fov.any(axis=1))
    cols = np.flatnonzero(fov.any(axis=0))
    sh, sw = fov.shape

    def extent(first: int, last: int, n_small: int, n_full: int) -> tuple[int, int]:
        start = first * step
        # The last block row/column also owns the remainder the pooling dropped.
        end = n_full if last == n_small - 1 else min(n_full, (last + 1) * step)
        return start, end

    top, bottom = extent(int(rows[0]), int(rows[-1]), sh, h)
    left, right = extent(int(cols[0]), int(cols[-1]), sw, w)
    # A circle cut by the frame, or notched, is centred on its widest rows (columns), not on
    # its box.
    if (top, left, bottom, right) == (0, 0, h, w):
        centre_row, centre_col = h / 2, w / 2  # no dark border: no circle to go by
    else:
        centre_row = (_widest(fov, rows) + 0.5) * step
        centre_col = (_widest(fov.T, cols) + 0.5) * step
    return (top, left, bottom, right), (float(min(centre_row, h)), float(min(centre_col, w)))


def fov_box(image: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the fundus field of view, bottom/right exclusive.

    The box is clipped to the frame (a circle cut off at the top and bottom spans all rows) and
    covers the whole frame when there is no dark border. None when no field of view is found:
    an all-black, uniform or nearly uniform image.
    """
    _check_image(image)
    found = _detect_fov(image)
    return None if found is None else found[0]


def _pad_before(size: int, side: int, centre: float) -> int:
    """Padding before a span of `size` px so that `centre` (within it) lands mid-square."""
    return int(min(max(round(side / 2 - centre), 0), side - size))


@dataclass(frozen=True)
class FundusPlacement:
    """Where `fundus_crop` puts the field of view: the box (top, left, bottom, right; bottom/right
    exclusive) cut from the image, pasted at (pad_top, pad_left) of a black (side, side) square.
    Heatmaps use it to carry a map of the square back onto the original photograph."""

    top: int
    left: int
    bottom: int
    right: int
    pad_top: int
    pad_left: int
    side: int


def fundus_placement(image: torch.Tensor) -> FundusPlacement | None:
    """The placement `fundus_crop` applies to `image`; None when it returns the image unchanged."""
    _check_image(image)
    found = _detect_fov(image)
    if found is None:
        return None
    (top, left, bottom, right), (centre_row, centre_col) = found
    height, width = bottom - top, right - left
    side = max(height, width)
    if (top, left, height, width) == (0, 0, image.shape[1], image.shape[2]) and height == width:
        return None  # already a square FOV with nothing to cut
    return FundusPlacement(top, left, bottom, right, _pad_before(height, side, centre_row - top),
                           _pad_before(width, side, centre_col - left), side)


def fundus_crop(image: torch.Tensor) -> torch.Tensor:
    """AutoMorph-style crop of a colour fundus photograph to a black square around its FOV.

    Crops to the field of view found by `fov_box` (only black is cut: a circle cut off by the
    frame keeps its full width) and pads with black to a (C, S, S) square, S the longer side
    of the box, with the circle's centre in the middle. Images without a dark border are only
    padded to a square; images without a field of view (all black, uniform) come back unchanged.
    """
    place = fundus_placement(image)
    if place is None:
        return image
    height, width = place.bottom - place.top, place.right - place.left
    out = image.new_zeros((image.shape[0], place.side, place.side))
    out[:, place.pad_top:place.pad_top + height, place.pad_left:place.pad_left + width] = \
        image[:, place.top:place.bottom, place.left:place.right]
    return out


def central_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, new height, new width) of the central `fraction` of a height x width image."""
    new_h, new_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    return (height - new_h) // 2, (width - new_w) // 2, new_h, new_w


def center_crop_fraction(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central `fraction` (0 < fraction <= 1) of an image's height and width.

    For OCT B-scans, whose edges carry little retina. Works on any (..., H, W) tensor; each
    side keeps at least one pixel.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if image.ndim < 2:
        raise ValueError(f"expected an image tensor (..., H, W), got shape {tuple(image.shape)}")
    top, left, new_h, new_w = central_box(*image.shape[-2:], fraction)
    return image[..., top:top + new_h, left:left + new_w].contiguous()


def image_statistics(image: torch.Tensor) -> dict[str, Any]:
    """Cheap per-image statistics for the modality guard.

    `colourfulness` (0..1): mean(max - min) / mean(max) over the channels of the non-dark
    pixels of a ~128 px strided copy; 0 for grayscale replicated to RGB. `aspect`: width /
    height. `bright_fraction`: share of non-dark pixels (near 0 for an all-black frame).
    """
    _check_image(image)
    _, h, w = image.shape
    step = max(1, math.ceil(max(h, w) / _STATS_SIDE))
    # Strided, not averaged: averaging would blend colours across edges and lower the score.
    small = image[:, ::step, ::step].float()
    vmax, vmin = small.amax(dim=0), small.amin(dim=0)
    bright = vmax >= _DARK_LEVEL
    n_bright = int(bright.sum())
    colourfulness = float((vmax - vmin)[bright].sum() / vmax[bright].sum()) if n_bright else 0.0
    return {
        "colourfulness": colourfulness,
        "aspect": w / h if h else 0.0,
        "height": int(h),
        "width": int(w),
        "bright_fraction": n_bright / bright.numel() if bright.numel() else 0.0,
    }


def guess_modality(stats: Sequence[Mapping[str, Any]]) -> str:
    """"CFP" when the images are mostly colour, "OCT" when mostly grayscale, else "unknown".

    Grayscale fundus modalities (red-free, autofluorescence, angiography) also read as "OCT":
    the guess is advisory, for `modality_warning`.
    """
    colour = gray = decided = 0
    for item in stats:
        value = float(item["colourfulness"])
        if math.isnan(value) or float(item.get("bright_fraction", 1.0)) < _MIN_BRIGHT_FRACTION:
            continue  # all-black frames say nothing about the modality
        if value >= COLOUR_MIN:
            colour += 1
            decided += 1
        elif value <= GRAY_MAX:
            gray += 1
            decided += 1
    if decided == 0:
        return "unknown"
    if colour >= MAJORITY * decided:
        return "CFP"
    if gray >= MAJORITY * decided:
        return "OCT"
    return "unknown"


_DESCRIPTION = {"CFP": "colour fundus photographs (CFP)", "OCT": "grayscale OCT B-scans"}


def modality_warning(model_modality: str, guessed: str, model_name: str) -> str | None:
    """A one-line warning when a CFP model gets images that look like OCT, or the reverse.

    None when they agree, when the model takes any modality, or when the guess is "unknown".
    """
    expected, seen = str(model_modality).upper(), str(guessed).upper()
    if expected not in _DESCRIPTION or seen not in _DESCRIPTION or expected == seen:
        return None
    return (
        f"model '{model_name}' expects {_DESCRIPTION[expected]} but these images look like "
        f"{_DESCRIPTION[seen]}; results will likely be meaningless "
        f"(pass --modality CFP|OCT to override this check)"
    )


# --- used by the workflows ---------------------------------------------------------------------
class FundusCrop:
    """`fundus_crop` as a transform step (a class, so DataLoader workers can pickle it)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return fundus_crop(image)


class CentralCrop:
    """`center_crop_fraction` as a transform step."""

    def __init__(self, fraction: float) -> None:
        from retinafm.settings import check_preprocessing

        check_preprocessing(fraction, None)  # refuse a bad fraction when the recipe is built, not per image
        self.fraction = fraction

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return center_crop_fraction(image, self.fraction)


def check_modality(paths: Sequence[str], model_modality: str, model_name: str, declared: str | None = None,
                   sample: int = 16) -> str | None:
    """Warn (and return the warning) when the images do not look like what the model was made for.
    `declared` (--modality) replaces the guess; up to `sample` images, evenly spread, are looked at."""
    import warnings

    from retinafm.data.io import ImageReadError, read_image

    if str(model_modality).upper() not in _DESCRIPTION:
        return None  # a model for any modality
    if declared is not None:
        guessed = declared.upper()
    else:
        chosen = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round())] \
            if len(paths) else []
        stats = []
        for path in chosen:
            try:
                # The statistic looks at a ~128 px copy: a reduced-scale decode is plenty, and fast.
                stats.append(image_statistics(read_image(path, decode_size=256)))
            except ImageReadError:
                continue  # reported where the images are read for real
        guessed = guess_modality(stats)
    message = modality_warning(model_modality, guessed, model_name)
    if message is not None and declared is not None:
        message = (f"model '{model_name}' expects {_DESCRIPTION[str(model_modality).upper()]} but --modality "
                   f"{declared} says these are {_DESCRIPTION[guessed]}; results will likely be meaningless")
    if message is not None:
        warnings.warn(message, stacklevel=2)
    return message

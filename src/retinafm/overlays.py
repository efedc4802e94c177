"""Heatmap overlays a clinician can read: the fundus (or B-scan) with the relevance colour-mapped on
top, and a contour around the most relevant region.

The colour is blended in proportion to the heatmap, so where the model did not look the image is
shown unchanged: a uniform tint would hide the retina a reader must check the map against. The
contour encloses the top 10 % of the relevance (the pixels at or above the 90th percentile of the
relevant pixels, those with a heatmap above 0): a region's outline reads at a glance where the
colours alone leave the reader guessing where "hot" ends. It is white with a thin dark edge outside
it, visible on bright and dark fundi alike, and drawn outside the region, so every pixel of the
region keeps its colour.

matplotlib is used only for its colour maps (no figures); the contour comes from scipy.ndimage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retinafm.files import atomic_path

TOP_FRACTION = 0.10  # the contour encloses this fraction of the relevant pixels
LINE_FRACTION = 0.004  # contour width as a fraction of the image's shorter side (at least 1 px)
CONTOUR_COLOUR = (255, 255, 255)
EDGE_COLOUR = (20, 20, 20)


def render_overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet",
                   top: float = TOP_FRACTION) -> np.ndarray:
    """The (H, W, 3) uint8 `image` with `heatmap` ((H, W), 0..1, higher = more relevant) blended in
    through colour map `cmap`, up to `alpha` opaque (reached at half the top relevance, none at 0),
    and a contour around the `top` fraction of the relevant pixels. A heatmap of all zeros gives the
    image unchanged. A grey (H, W) or (H, W, 1) image is shown as RGB. Raises ValueError when the
    shapes differ, the inputs are not an image and a heatmap, or `cmap` is no matplotlib colour map."""
    rgb = _rgb(image)
    relevance = _heatmap(heatmap, rgb.shape[:2])
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in 0..1, not {alpha}")
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be a fraction in (0, 1], not {top}")
    if not (relevance > 0).any():
        return rgb.copy()

    import matplotlib

    # Only the relevant pixels are blended: the rest stay exactly the image (and an 8000 px photograph
    # with a small relevant region is not pushed through float arithmetic).
    relevant = relevance > 0
    value = relevance[relevant]
    # A 256-entry lookup table: the colour map called on every pixel of a large photograph takes seconds.
    try:
        colour_map = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"{cmap!r} is not a matplotlib colour map (e.g. jet, turbo, inferno)") from None
    table = colour_map(np.linspace(0.0, 1.0, 256), bytes=True)[:, :3].astype(np.float32)
    colours = table[np.rint(value * 255).astype(np.uint8)]
    # Full strength from half the top relevance up, fading to nothing at 0: weak relevance (the
    # low-level haze every explainer leaves) barely tints the retina, while the region that matters
    # is clearly coloured (weighted by the relevance itself, a 0.5 region drowned in the fundus's red).
    weight = (alpha * np.minimum(1.0, 2.0 * value))[:, None]
    out = rgb.copy()
    out[relevant] = np.clip(np.rint(rgb[relevant] * (1.0 - weight) + colours * weight), 0, 255).astype(np.uint8)

    region = top_region(relevance, top)
    ring, edge = contour_rings(region, line_width(rgb.shape[:2]))
    out[edge] = EDGE_COLOUR
    out[ring] = CONTOUR_COLOUR
    return out


def write_overlay(path: str | Path, image: np.ndarray, heatmap: np.ndarray, **kwargs: float | str) -> Path:
    """Render the overlay (render_overlay's keywords) and write it as a PNG at `path`, atomically."""
    from PIL import Image

    path = Path(path)
    overlay = render_overlay(image, heatmap, **kwargs)  # type: ignore[arg-type]
    with atomic_path(path) as tmp:
        Image.fromarray(overlay).save(tmp, format="PNG")
    return path


def top_region(heatmap: np.ndarray, top: float = TOP_FRACTION) -> np.ndarray:
    """The bool mask of the pixels at or above the (1 - top) quantile of the heatmap's positive
    values: zeros are "not looked at", so a map relevant in one corner still gets a tight region."""
    positive = heatmap[heatmap > 0]
    if positive.size == 0:
        return np.zeros(heatmap.shape, dtype=bool)
    cut = np.quantile(positive, 1.0 - top)
    return heatmap >= cut


def line_width(shape: tuple[int, int]) -> int:
    """The contour's width in pixels: about 0.4 % of the shorter side, so it looks the same on a
    thumbnail of a 4000 px photograph as on a 224 px crop; at least 1 px."""
    return max(1, int(round(LINE_FRACTION * min(shape))))


def contour_rings(region: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ring, edge): the `width` px band just outside `region`, and a thinner band just outside it.

    A binary dilation by a square minus what it grew from. The dilation is done as scipy's
    maximum filter, which runs as two 1-D passes whatever the size: an 8000 px image with a 32 px
    line stays a fraction of a second, where binary_dilation with a 65 × 65 structure takes minutes.
    """
    edge_width = max(1, width // 2)
    ring = np.zeros(region.shape, dtype=bool)
    edge = np.zeros(region.shape, dtype=bool)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return ring, edge
    # Only the region's bounding box, grown by the lines, can change: a small region on a large image
    # is filtered in a small window.
    pad = width + edge_width
    window = (slice(max(0, rows[0] - pad), rows[-1] + pad + 1), slice(max(0, cols[0] - pad), cols[-1] + pad + 1))
    inside = region[window]
    grown = _dilate(inside, width)
    ring[window] = grown & ~inside
    edge[window] = _dilate(inside, width + edge_width) & ~grown
    return ring, edge


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` dilated by a (2 radius + 1)² square; nothing grows in from beyond the border."""
    from scipy import ndimage

    return ndimage.maximum_filter(mask.astype(np.uint8), size=2 * radius + 1, mode="constant", cval=0) > 0


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"the image must be uint8 (0..255), not {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:  # grey (an OCT B-scan): shown as RGB so the colour map can go on it
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the image must be (H, W, 3) RGB, not of shape {tuple(image.shape)}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"the image is empty (shape {tuple(image.shape)})")
    return image


def _heatmap(heatmap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"the heatmap must be (H, W), not of shape {tuple(heatmap.shape)}")
    if heatmap.shape != tuple(shape):
        raise ValueError(f"the heatmap is {heatmap.shape[0]}×{heatmap.shape[1]} (H×W) but the image is "
                         f"{shape[0]}×{shape[1]}: resize the heatmap to the image's resolution first")
    if not np.issubdtype(heatmap.dtype, np.number) or np.issubdtype(heatmap.dtype, np.complexfloating):
        raise ValueError(f"the heatmap must hold real numbers, not {heatmap.dtype}")
    # NaN (a masked-out pixel) counts as not relevant; values outside 0..1 are clipped, not rescaled,
    # so the colours keep the meaning the explainer gave them.
    relevance = np.nan_to_num(heatmap.astype(np.float32), copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(relevance, 0.0, 1.0, out=relevance)

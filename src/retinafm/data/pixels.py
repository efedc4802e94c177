"""Pixel arrays from any decoder as RGB uint8."""
from __future__ import annotations

import numpy as np
from PIL import Image

from retinafm.data.dicom import stretch_to_uint8


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an (H, W, 3) uint8 array.

    16-bit and float images are scaled by their own min/max into 0..255 (medical exports rarely
    use the full 16-bit range, so a fixed divide-by-256 would give near-black images).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.repeat(stretch_to_uint8(np.asarray(img))[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas become black, like the unlit border of a fundus photograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy torch can wrap

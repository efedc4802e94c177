"""Where each pixel of a model's input came from, so that a map over the input can be laid back on the file.

The evaluation recipe (data.transforms.eval_transform) crops the fundus field of view, keeps the central
part of a B-scan, resizes the shortest side and centre-crops. Every one of those steps moves each axis by
a scale and a shift, so `traced_transform` runs the recipe's own steps one by one and keeps, per axis,
the affine map from the original file's pixel centres to the input's (`InputTrace`). `to_original` then
samples an input-sized map at every pixel of the file: pixels the model never saw (cut by a crop) get 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from retinafm.data.preprocess import CentralCrop, FundusCrop, central_box, fundus_placement

# Rows of the file sampled at a time: bounds the sampling grid of a 10,000 px image to ~80 MB.
_ROWS_PER_CHUNK = 1024


@dataclass(frozen=True)
class Axis:
    """position in the current image = scale * position in the file + shift (pixel centres, in pixels),
    for the file's pixels p with low <= p < high; the others were cut away."""

    scale: float
    shift: float
    low: float
    high: float
    size: int  # the current image's extent along this axis

    def crop(self, start: int, length: int, pad: int = 0) -> Axis:
        """Keep [start, start + length) of the current image, then put it `pad` pixels in."""
        shift = self.shift - start + pad
        low = max(self.low, (start - 0.5 - self.shift) / self.scale)
        high = min(self.high, (start + length - 0.5 - self.shift) / self.scale)
        return Axis(self.scale, shift, low, high, self.size)

    def resize(self, new_size: int) -> Axis:
        ratio = new_size / self.size
        return Axis(self.scale * ratio, (self.shift + 0.5) * ratio - 0.5, self.low, self.high, new_size)


@dataclass(frozen=True)
class InputTrace:
    """The file's size and, per axis, where its pixels ended up in the model's input."""

    height: int
    width: int
    rows: Axis
    cols: Axis

    @classmethod
    def identity(cls, height: int, width: int) -> InputTrace:
        return cls(height, width, Axis(1.0, 0.0, -0.5, height - 0.5, height),
                   Axis(1.0, 0.0, -0.5, width - 0.5, width))

    def crop(self, top: int, left: int, height: int, width: int, pad_top: int = 0, pad_left: int = 0,
             new_height: int | None = None, new_width: int | None = None) -> InputTrace:
        rows = replace(self.rows.crop(top, height, pad_top), size=new_height or height)
        cols = replace(self.cols.crop(left, width, pad_left), size=new_width or width)
        return replace(self, rows=rows, cols=cols)

    def resize(self, height: int, width: int) -> InputTrace:
        return replace(self, rows=self.rows.resize(height), cols=self.cols.resize(width))


def _centre_crop(image: torch.Tensor, trace: InputTrace, step: v2.CenterCrop) -> InputTrace:
    """torchvision's centre crop: pad symmetrically (floor before) when smaller, then crop at round((n - s) / 2)."""
    size = step.size
    out_h, out_w = (size, size) if isinstance(size, int) else (size[0], size[-1])
    height, width = image.shape[-2:]
    pad_top, pad_left = max(out_h - height, 0) // 2, max(out_w - width, 0) // 2
    top = int(round((max(height, out_h) - out_h) / 2.0))
    left = int(round((max(width, out_w) - out_w) / 2.0))
    # the crop starts at `top` of the padded image, which is `top - pad_top` of this one
    return trace.crop(top - pad_top, left - pad_left, out_h, out_w, new_height=out_h, new_width=out_w)


def _step_trace(step: Callable, image: torch.Tensor, trace: InputTrace) -> tuple[torch.Tensor, InputTrace]:
    if isinstance(step, FundusCrop):
        place = fundus_placement(image)
        if place is None:
            return image, trace
        trace = trace.crop(place.top, place.left, place.bottom - place.top, place.right - place.left,
                           place.pad_top, place.pad_left, new_height=place.side, new_width=place.side)
        return step(image), trace
    if isinstance(step, CentralCrop):
        top, left, height, width = central_box(*image.shape[-2:], step.fraction)
        return step(image), trace.crop(top, left, height, width)
    if isinstance(step, v2.CenterCrop):
        return step(image), _centre_crop(image, trace, step)
    if isinstance(step, v2.Resize):
        out = step(image)
        return out, trace.resize(*out.shape[-2:])
    if isinstance(step, (v2.ToDtype, v2.Normalize, v2.Identity)):
        return step(image), trace
    raise ValueError(f"heatmaps cannot map the model's input back onto the file through {type(step).__name__}; "
                     "the evaluation recipe has a step they do not know")


def traced_transform(transform: v2.Compose, image: torch.Tensor) -> tuple[torch.Tensor, InputTrace]:
    """`transform(image)` and where each pixel of `image` (3, H, W) landed in the result."""
    trace = InputTrace.identity(*image.shape[-2:])
    for step in transform.transforms:
        image, trace = _step_trace(step, image, trace)
    if (trace.rows.size, trace.cols.size) != tuple(image.shape[-2:]):  # a step traced wrongly
        raise AssertionError(f"traced size {(trace.rows.size, trace.cols.size)} != {tuple(image.shape[-2:])}")
    return image, trace


def _grid_axis(axis: Axis, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample coordinates (align_corners=False) of `count` file pixels along `axis`, and which were seen."""
    position = torch.arange(count, dtype=torch.float64)
    inside = (position >= axis.low) & (position < axis.high)
    current = axis.scale * position + axis.shift
    inside &= (current >= -0.5) & (current <= axis.size - 0.5)
    return ((current + 0.5) * 2 / axis.size - 1).float(), inside


def to_original(heatmap: torch.Tensor | np.ndarray, trace: InputTrace) -> np.ndarray:
    """An input-sized (S, S) map laid back on the file: float32 (H, W), 0 where the model saw nothing,
    rescaled so that its maximum is 1 again (bilinear sampling rarely lands on the peak)."""
    heat = torch.as_tensor(heatmap, dtype=torch.float32)
    if tuple(heat.shape) != (trace.rows.size, trace.cols.size):
        raise ValueError(f"heatmap of shape {tuple(heat.shape)} for an input of {(trace.rows.size, trace.cols.size)}")
    grid_y, seen_y = _grid_axis(trace.rows, trace.height)
    grid_x, seen_x = _grid_axis(trace.cols, trace.width)
    out = np.zeros((trace.height, trace.width), np.float32)
    for start in range(0, trace.height, _ROWS_PER_CHUNK):
        ys = grid_y[start:start + _ROWS_PER_CHUNK]
        grid = torch.stack([grid_x.expand(len(ys), -1), ys[:, None].expand(-1, trace.width)], dim=-1)
        sampled = F.grid_sample(heat[None, None], grid[None], mode="bilinear", padding_mode="border",
                                align_corners=False)[0, 0]
        seen = seen_y[start:start + _ROWS_PER_CHUNK, None] & seen_x[None, :]
        out[start:start + len(ys)] = torch.where(seen, sampled, 0.0).numpy()
    peak = float(out.max()) if out.size else 0.0
    return out / peak if peak > 0 else out

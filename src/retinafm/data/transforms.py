"""The image recipe of a model: RETFound's train augmentation and eval resize + centre crop.

Works on uint8 (3, H, W) tensors from data.io with torchvision's v2 transforms, which is about
twice as fast as the PIL path; conversion to float happens after the geometric ops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

# RETFound's eval crop: resize the short side to input/0.875, then centre-crop input.
EVAL_CROP_PCT = 0.875


@dataclass(frozen=True)
class AugmentSettings:
    crop_min_scale: float = 0.08
    randaug_magnitude: int = 9
    randaug_ops: int = 2
    reprob: float = 0.25


@dataclass(frozen=True)
class Preprocessing:
    """Steps before the model's recipe, saved in the checkpoint so `predict` repeats them."""

    fundus_crop: bool = False  # crop to the circular field of view, padded square (AutoMorph-style)
    oct_crop: float | None = None  # keep this central fraction of each B-scan

    def ops(self) -> list:
        from retinafm.data.preprocess import CentralCrop, FundusCrop

        return ([FundusCrop()] if self.fundus_crop else []) + ([CentralCrop(self.oct_crop)] if self.oct_crop else [])

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Preprocessing:
        return cls(**(state or {}))


def eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = EVAL_CROP_PCT, preprocessing: Preprocessing = Preprocessing()) -> v2.Compose:
    resize = int(round(input_size / crop_pct))
    compose = v2.Compose([
        *preprocessing.ops(),
        v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(input_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])
    compose.decode_size = _decode_size(resize, preprocessing)
    return compose


def _decode_size(shortest_side: float, preprocessing: Preprocessing) -> int:
    """The shortest side a decoder must deliver (ImageDataset passes it to read_image): a fundus
    crop keeps only the field of view, so it asks for more."""
    return int(math.ceil(shortest_side * (1.5 if preprocessing.fundus_crop else 1.0)))


def train_transform(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentSettings = AugmentSettings(),
    preprocessing: Preprocessing = Preprocessing(),
) -> v2.Compose:
    ops: list = [
        *preprocessing.ops(),
        v2.RandomResizedCrop(
            input_size, scale=(augment.crop_min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(),
    ]
    if augment.randaug_magnitude > 0:
        ops.append(v2.RandAugment(num_ops=augment.randaug_ops, magnitude=augment.randaug_magnitude))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if augment.reprob > 0:
        # RETFound erases with per-pixel random values ('pixel' mode) after normalisation.
        ops.append(v2.RandomErasing(p=augment.reprob, value="random"))
    compose = v2.Compose(ops)
    # The smallest random crop (crop_min_scale of the area) must still have input_size pixels.
    compose.decode_size = _decode_size(input_size / math.sqrt(augment.crop_min_scale), preprocessing)
    return compose


def pretrain_transform(input_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2,
                       preprocessing: Preprocessing = Preprocessing()) -> v2.Compose:
    """MAE's (and RETFound's) pretraining augmentation: random resized crop (min_scale-1 of the
    area) and a horizontal flip, nothing else."""
    compose = v2.Compose([
        *preprocessing.ops(),
        v2.RandomResizedCrop(input_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])
    compose.decode_size = _decode_size(input_size / math.sqrt(min_scale), preprocessing)
    return compose


class MultiCrop:
    """DINO's views of one image: two global crops (the second with solarisation, less blur)
    and `local_crops` small ones, each with DINO's flip, colour jitter, grayscale and blur.
    Returns a list of tensors, globals first."""

    def __init__(self, input_size: int, local_size: int, mean: Sequence[float], std: Sequence[float], *,
                 local_crops: int = 6, global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4),
                 preprocessing: Preprocessing = Preprocessing()) -> None:
        self.pre = v2.Compose(preprocessing.ops() or [v2.Identity()])
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]

        def view(size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the crop, odd
            return v2.Compose([
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur),
                v2.RandomSolarize(threshold=128, p=solarize),
                *finish,
            ])

        self.globals = [view(input_size, global_scale, 1.0, 0.0), view(input_size, global_scale, 0.1, 0.2)]
        self.local = view(local_size, local_scale, 0.5, 0.0)
        self.local_crops = local_crops
        self.decode_size = _decode_size(max(input_size / math.sqrt(global_scale[0]),
                                            local_size / math.sqrt(local_scale[0])), preprocessing)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        image = self.pre(image)
        return [t(image) for t in self.globals] + [self.local(image) for _ in range(self.local_crops)]

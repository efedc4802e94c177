"""Segmentation models: a zoo ViT backbone plus a dense decoder, logits at the input size.

Two decoders, the two the issue names:

- `LinearSegHead`: RETFound PR #55's minimal head. The last block's patch tokens on the patch
  grid -> bilinear upsampling to the input size -> conv3x3 -> ReLU -> conv1x1 to the classes.
  By default a per-token linear projection (a 1x1 conv, D -> `hidden`) comes first: a 1x1 conv
  and bilinear interpolation are both linear per pixel and the interpolation weights sum to 1, so
  projecting before upsampling gives exactly what projecting after would, while the full-resolution
  tensor holds `hidden` channels instead of D (1024 for ViT-L: 1 GiB per 512 px image in float32).
  `hidden=None` keeps PR #55's literal order (upsample all D channels, conv3x3 on them).
- `UNETRHead`: UNETR-style decoder (VisionFM's segmentation decoder) on four intermediate blocks,
  deepest first: the deepest map is decoded by deconvolution (ConvTranspose2d, x2 per stage) and
  at each stage concatenated with an earlier block's map brought to the same scale by its own
  chain of deconvolutions (the "deconvolution skips"); once at the input size, it is
  concatenated with a convolution of the input image itself (the "image skip", the only path
  with pixel-level detail finer than a patch) and mapped to the classes by a 1x1 conv.

Parameter names (why the model is built the way it is): `SegmentationModel` shares the
backbone's own registries of parameters, buffers and submodules, so the backbone's parameters
keep their exact timm names (`patch_embed.*`, `blocks.N.*`, `norm.*`...). RETFound or
classification weights therefore load with the same adapters and `load_state_dict` as for a
classifier, and timm's layer-wise lr decay (engine.optim, grouping by `blocks.N` through the
backbone's `group_matcher`) groups the backbone exactly as for classification. The decoder lives
under `head.`: the weight loader already drops `head.*` from pretraining checkpoints (so a
checkpoint's classifier never collides with the decoder), linear probing already trains
exactly `head.*` (i.e. a frozen backbone with a trained decoder), and names outside the backbone's
groups get the top lr scale (1) in timm's layer decay, as a classifier head does.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format

from retinafm.models.registry import ModelSpec, create_model, get_spec

HEAD_CHOICES = ("linear", "unetr")
# VisionFM's decoder taps (ABILab-CUHK/VisionFM, segmentation config) for ViT-B (12 blocks).
VISIONFM_BLOCKS_12 = (3, 5, 7, 11)


def default_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """The blocks a UNETR decoder taps: VisionFM's [3, 5, 7, 11] for 12 blocks, otherwise `count`
    evenly spaced ending at the last ([5, 11, 17, 23] for 24 blocks, VisionFM's ViT-L choice;
    [0, 1, 2, 3] for 4). Evenly spaced taps see low-, mid- and high-level features at every depth."""
    if depth < 1:
        raise ValueError(f"a backbone needs at least one block, got depth {depth}")
    if depth == 12 and count == 4:
        return VISIONFM_BLOCKS_12
    taps = sorted({max(0, round(depth * (k + 1) / count) - 1) for k in range(count)})
    return tuple(taps)


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, dividing the channels. GroupNorm, not BatchNorm, because it
    behaves the same in training and evaluation and at batch size 1 (512 px ViT-L fine-tuning
    often runs 1-2 images per GPU); not InstanceNorm, which fails on a 1x1 patch grid."""
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ConvBlock(nn.Sequential):
    """conv3x3 -> GroupNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Sequential):
    """ConvTranspose2d(k=2, s=2) doubling the resolution -> conv3x3 -> GroupNorm -> ReLU (UNETR's
    deconvolution block)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2),
            ConvBlock(out_channels, out_channels),
        )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LinearSegHead(nn.Module):
    """RETFound PR #55's head on the last block (see the module docstring for the projection)."""

    def __init__(self, embed_dim: int, num_classes: int, *, blocks: Sequence[int], hidden: int | None = 128):
        super().__init__()
        if len(blocks) != 1:
            raise ValueError(f"the linear head reads one block, got {list(blocks)}")
        self.blocks = tuple(int(b) for b in blocks)
        width = embed_dim if hidden is None else hidden
        self.proj: nn.Module = nn.Identity() if hidden is None else nn.Conv2d(embed_dim, hidden, 1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        x = _resize(self.proj(features[-1]), tuple(images.shape[-2:]))
        return self.out(self.act(self.conv(x)))


class UNETRHead(nn.Module):
    """UNETR-style decoder on four blocks' patch maps plus the image (see the module docstring).

    Scales are relative to the patch grid: the deepest map starts at x1, and after stage j (1..3)
    the decoder is at x2^j, where the j-th deepest skip (brought there by j deconvolutions) joins
    it. At x8 the patch size is 8 (vit_micro); otherwise ceil(log2(patch / 8)) more deconvolutions
    (one for patch 14 and 16) and, where the patch is not a power of two (14), a bilinear resize
    reach the input size exactly, whatever its shape. Widths: 8f, 4f, 2f, f at x1..x8, f at full
    resolution, with f = `features` (UNETR's feature_size, 16 there; 32 here by default)."""

    def __init__(self, embed_dim: int, num_classes: int, *, blocks: Sequence[int], patch_size: int,
                 features: int = 32, in_channels: int = 3):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"the UNETR head taps four blocks, got {list(blocks)}")
        if list(blocks) != sorted(set(blocks)):
            raise ValueError(f"the UNETR blocks must be increasing, got {list(blocks)}")
        if features < 1 or patch_size < 1:
            raise ValueError(f"features and patch size must be positive, got {features}, {patch_size}")
        self.blocks = tuple(int(b) for b in blocks)
        widths = [features * 8, features * 4, features * 2, features]  # at x1, x2, x4, x8
        self.bottleneck = ConvBlock(embed_dim, widths[0])
        # skips[j-1]: the j-th deepest tap (blocks[3 - j]) brought to x2^j by j deconvolutions.
        self.skips = nn.ModuleList()
        for j in (1, 2, 3):
            chain: list[nn.Module] = [nn.ConvTranspose2d(embed_dim, widths[j], 2, stride=2)]
            chain += [UpBlock(widths[j], widths[j]) for _ in range(j - 1)]
            self.skips.append(nn.Sequential(*chain))
        self.ups = nn.ModuleList([UpBlock(widths[j - 1], widths[j]) for j in (1, 2, 3)])
        self.fuse = nn.ModuleList([nn.Sequential(ConvBlock(2 * widths[j], widths[j]), ConvBlock(widths[j], widths[j]))
                                   for j in (1, 2, 3)])
        extra = max(0, math.ceil(math.log2(patch_size / 8))) if patch_size > 8 else 0
        self.final_ups = nn.Sequential(*[UpBlock(features, features) for _ in range(extra)])
        self.image_skip = nn.Sequential(ConvBlock(in_channels, features), ConvBlock(features, features))
        self.fuse_image = nn.Sequential(ConvBlock(2 * features, features), ConvBlock(features, features))
        self.out = nn.Conv2d(features, num_classes, 1)

    def forward(self, features: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        *earlier, deepest = features  # shallowest first, as the backbone returns them
        x = self.bottleneck(deepest)
        for j in (1, 2, 3):
            skip = self.skips[j - 1](earlier[3 - j])
            x = self.fuse[j - 1](torch.cat([self.ups[j - 1](x), skip], dim=1))
        x = _resize(self.final_ups(x), tuple(images.shape[-2:]))
        x = self.fuse_image(torch.cat([x, self.image_skip(images)], dim=1))
        return self.out(x)


def allow_any_input_size(backbone: nn.Module) -> None:
    """Let a timm ViT take any input whose sides are multiples of the patch (non-square too):
    timm's `dynamic_img_size` mode, switched on after construction (create_model builds a fixed
    size). The position embedding is then resampled to each input's patch grid on the fly; at the
    built size it is used unchanged, so outputs there are identical. No parameter changes."""
    patch_embed = backbone.patch_embed
    if getattr(backbone, "dynamic_img_size", False):
        return
    backbone.dynamic_img_size = True
    patch_embed.strict_img_size = False
    patch_embed.flatten = False
    patch_embed.output_fmt = Format.NHWC


def _patch_size(backbone: nn.Module) -> int:
    size = backbone.patch_embed.patch_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ValueError(f"square patches only, got {size}")
    return int(size[0])


class SegmentationModel(nn.Module):
    """images (B, 3, H, W) -> logits (B, num_classes, H, W), H and W multiples of the patch size.

    The backbone's parameters, buffers and submodules are this module's own (the same registries,
    shared), so state-dict keys are the backbone's plus `head.*` (the decoder); see the module
    docstring for why. The backbone's own `head` (an Identity when built with num_classes=0) is
    replaced by the decoder, which the backbone never calls: features come from timm's
    `forward_intermediates` (prefix tokens, i.e. class and register tokens, dropped; the
    backbone's final norm applied to every tapped block). Parameters of the backbone that
    segmentation does not use (fc_norm of average-pooling models) stay, so that the keys match a
    classifier's and its weights load; they get no gradient."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int):
        super().__init__()
        if not hasattr(backbone, "forward_intermediates"):
            raise TypeError(f"{type(backbone).__name__} has no forward_intermediates (a timm ViT is needed)")
        blocks = getattr(head, "blocks", None)
        depth = len(backbone.blocks)
        if not blocks or any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"the head taps blocks {blocks}, but the backbone has blocks 0..{depth - 1}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        allow_any_input_size(backbone)
        # Share the registries: the backbone's forward uses its own attributes, this module's
        # state dict, .to(), train() and optimisers see the very same tensors under the same names.
        self._parameters = backbone._parameters
        self._buffers = backbone._buffers
        self._non_persistent_buffers_set = backbone._non_persistent_buffers_set
        self._modules = backbone._modules
        object.__setattr__(self, "backbone", backbone)  # not registered a second time
        self.head = head  # replaces the backbone's (unused) head in the shared registry
        self.num_classes = num_classes
        self.patch_size = _patch_size(backbone)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        self.backbone.training = mode  # the backbone object itself is not among the children
        return self

    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's groups (timm layer-wise lr decay: `blocks.N`); `head.*` falls outside
        them and gets the top scale, like a classifier's head."""
        return self.backbone.group_matcher(coarse=coarse)

    def no_weight_decay(self) -> set[str]:
        return set(self.backbone.no_weight_decay())

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped blocks' patch tokens as (B, D, H/p, W/p) maps, shallowest first."""
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a whole number of {self.patch_size} px patches")
        return self.backbone.forward_intermediates(images, indices=list(self.head.blocks), norm=True,
                                                   stop_early=True, output_fmt="NCHW", intermediates_only=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images), images)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SegmentationModel) -> dict[str, torch.Tensor]:
    """The backbone's timm checkpoint filter (position embedding resampled to the model's patch
    grid, timm layout conversions), applied for the backbone. models.weights looks this function
    up in the module of the model's class, so segmentation models load pretrained weights through
    the same path (load_backbone_weights) as classifiers."""
    backbone = model.backbone
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    return filter_fn(state_dict, backbone) if filter_fn is not None else state_dict


def build_segmentation_model(
    model: ModelSpec | str,
    num_classes: int,
    *,
    head: str = "linear",
    input_size: int | None = None,
    blocks: Sequence[int] | None = None,
    drop_path: float = 0.0,
    hidden: int | None = 128,
    features: int = 32,
) -> SegmentationModel:
    """A zoo model (or timm ViT name) as a segmentation model with fresh, random weights (load
    pretrained ones into it as for a classifier). `blocks` overrides the tapped blocks (one for
    linear, default the last; four for unetr, default `default_blocks`). Nothing is downloaded:
    the backbone is built with pretrained=False."""
    if head not in HEAD_CHOICES:
        raise ValueError(f"--head must be one of {', '.join(HEAD_CHOICES)} for segmentation, not {head!r}")
    spec = get_spec(model) if isinstance(model, str) else model
    backbone = create_model(spec, num_classes=0, input_size=input_size, drop_path=drop_path)
    depth = len(backbone.blocks)
    dim = int(backbone.num_features)
    if head == "linear":
        decoder: nn.Module = LinearSegHead(dim, num_classes, blocks=blocks or (depth - 1,), hidden=hidden)
    else:
        decoder = UNETRHead(dim, num_classes, blocks=blocks or default_blocks(depth),
                            patch_size=_patch_size(backbone), features=features)
    return SegmentationModel(backbone, decoder, num_classes)

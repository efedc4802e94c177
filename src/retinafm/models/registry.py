"""The model zoo: one spec per pretrained model, and the factory that builds it with timm.

A spec says how to build the backbone (timm architecture + overrides), its image recipe
(input size, mean/std), where its weights live and which checkpoint family's adapter reads them.
Any timm ViT name also works as --model, with no weights unless --weights names some.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn as nn

from retinafm.files.inputs import describe_size
from retinafm.models.heads import HeadSettings, attach_head
from retinafm.settings.base import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RETFOUND_LICENCE = "CC-BY-NC-4.0, gated"
DINOV3_LICENCE = "DINOv3 License, gated"
CC_BY_NC = "CC-BY-NC-4.0"

# Patch tokens per image. Attention holds tokens² numbers per head and image, and the position
# embedding grows with the tokens too: above MAX_TOKENS (a 2048 px image at patch 16, 1 GiB per
# attention map) the model is refused before anything is allocated; above WARN_TOKENS (1024 px at
# patch 16, RETFound's 224 px is 196 tokens) it runs, with a warning about memory and time.
MAX_TOKENS = 16_384
WARN_TOKENS = 4_096

# VisionFM normalises each modality with its own statistics (utils.get_stats in ABILab-CUHK/VisionFM).
VISIONFM_STATS = {
    "Fundus": ((0.423737496137619, 0.2609460651874542, 0.128403902053833),
               (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)),
    "OCT": ((0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)),
}
# VisionFM's encoders are published on Google Drive only (README of ABILab-CUHK/VisionFM).
VISIONFM_URLS = {
    "Fundus": "https://drive.google.com/file/d/13uWm0a02dCWyARUcrCdHZIcEgRfBmVA4/view",
    "OCT": "https://drive.google.com/file/d/1o6E-ine2QLx2pxap-c77u-SU0FjxwypA/view",
}
# RetFiner's refined vision encoders are GitHub release assets (README of ronnief1/RetFiner).
RETFINER_RELEASE = "https://github.com/ronnief1/RetFiner/releases/download/weights/"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # timm architecture name
    input_size: int = 224
    patch_size: int = 16
    modality: str = "any"  # CFP | OCT | any
    family: str = "timm"  # checkpoint family: a key of weights.ADAPTERS (retfound_mae, visionfm, retfiner, timm...)
    hf_repo: str | None = None
    hf_filename: str | None = None
    global_pool: str | None = None  # None: the architecture's own default in timm
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    licence: str = "-"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # Weights published outside the Hugging Face Hub: where to download the file, which is then
    # passed with --weights PATH (the model is never silently left at random initialisation).
    weights_url: str | None = None

    def input_size_for(self, requested: int | None, source: str = "--input-size") -> int:
        """The input size a run uses: `requested` (--input-size) or the model's own (None; 0 is
        refused, not taken as the default). The one input-size check: a whole number of patches
        across, and a token count (hence memory) within MAX_TOKENS, a warning above WARN_TOKENS.
        `source` names where the size came from (a flag, a checkpoint's metadata)."""
        size = self.input_size if requested is None else requested
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{source} {size!r}: the input size must be a whole number of pixels, at least 1; "
                              f"omit {source} for the default")
        if size % self.patch_size:
            raise ConfigError(f"{source} {size} must be a multiple of the patch size {self.patch_size} "
                              f"of {self.name}")
        tokens = (size // self.patch_size) ** 2
        if tokens > MAX_TOKENS:
            largest = int(MAX_TOKENS**0.5) * self.patch_size
            raise ConfigError(f"{source} {size} means {tokens:,} patch tokens per image at patch size "
                              f"{self.patch_size}; one attention map alone would take {describe_size(tokens**2 * 4)} "
                              f"per head and image. The limit is {MAX_TOKENS:,} tokens ({largest} px for "
                              f"{self.name})")
        if tokens > WARN_TOKENS:
            attention = describe_size(tokens**2 * 4)
            warnings.warn(f"{source} {size} means {tokens:,} patch tokens per image ({self.name} was made for "
                          f"{self.input_size} px); attention takes {attention} per head and image, and time grows "
                          "with the square of the tokens", UserWarning, stacklevel=1)
        return size

    @property
    def weight_source(self) -> str:
        if self.hf_repo:
            return f"hf:{self.hf_repo}"
        if self.weights_url:
            return "download, then --weights PATH"
        return "none (random init)"


def _retfound_mae(name: str, modality: str, about: str) -> ModelSpec:
    return ModelSpec(
        name=name, arch="vit_large_patch16_224", patch_size=16, modality=modality, family="retfound_mae",
        hf_repo=f"YukunZhou/{name}", hf_filename=f"{name}.pth", global_pool="avg",
        licence=RETFOUND_LICENCE, description=about,
    )


def _retfound_dinov2(name: str, about: str) -> ModelSpec:
    return ModelSpec(
        name=name, arch="vit_large_patch14_dinov2", patch_size=14, modality="CFP", family="retfound_dinov2",
        hf_repo=f"YukunZhou/{name}", hf_filename=f"{name}.pth", global_pool="avg",
        licence=RETFOUND_LICENCE, description=about,
    )


def _dinov2(size: str, arch: str) -> ModelSpec:
    return ModelSpec(
        name=f"dinov2_vit{size}14", arch=arch, patch_size=14, family="dinov2",
        hf_repo=f"timm/{arch}.lvd142m", hf_filename="model.safetensors", licence="Apache-2.0",
        description=f"DINOv2 ViT-{size.upper()}/14 (natural images, LVD-142M)",
    )


def _dinov3(size: str, arch: str) -> ModelSpec:
    return ModelSpec(
        name=f"dinov3_vit{size}16", arch=arch, patch_size=16, family="dinov3",
        hf_repo=f"timm/{arch}.lvd1689m", hf_filename="model.safetensors", licence=DINOV3_LICENCE,
        description=f"DINOv3 ViT-{size.upper()}/16 (natural images, LVD-1689M)",
    )


def _visionfm(modality: str, short: str) -> ModelSpec:
    mean, std = VISIONFM_STATS[modality]
    url = VISIONFM_URLS[modality]
    return ModelSpec(
        name=f"VisionFM_{modality}", arch="vit_base_patch16_224", patch_size=16, modality=short, family="visionfm",
        global_pool="token", mean=mean, std=std, licence=CC_BY_NC, weights_url=url,
        description=(f"VisionFM {modality} encoder, iBOT ViT-B/16 (NEJM AI 2024); not on the Hub: download "
                     f"VFM_{modality}_weights.pth from {url} and pass it with --weights PATH"),
    )


def _retfiner(base: str, letter: str, arch: str, pool: str, about: str, **recipe: Any) -> ModelSpec:
    url = f"{RETFINER_RELEASE}RetFiner_{base}.pth"
    return ModelSpec(
        name=f"RetFiner_{base}", arch=arch, patch_size=16, modality="OCT", family="retfiner", global_pool=pool,
        licence=CC_BY_NC, weights_url=url,
        description=(f"RetFiner-{letter}: {about} refined on OCT B-scans and reports (MICCAI 2025); not on the "
                     f"Hub: download {url} and pass it with --weights PATH"),
        **recipe,
    )


def _plain(name: str, arch: str, about: str, input_size: int = 224, patch: int = 16, **arch_kwargs: Any) -> ModelSpec:
    return ModelSpec(
        name=name, arch=arch, input_size=input_size, patch_size=patch, global_pool="avg",
        arch_kwargs=arch_kwargs, description=about,
    )


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        _retfound_mae("RETFound_mae_natureCFP", "CFP", "RETFound-MAE, 904k colour fundus photographs (Nature 2023)"),
        _retfound_mae("RETFound_mae_natureOCT", "OCT", "RETFound-MAE, 736k OCT B-scans (Nature 2023)"),
        _retfound_mae("RETFound_mae_meh", "CFP", "RETFound-MAE, Moorfields colour fundus photographs"),
        _retfound_mae("RETFound_mae_shanghai", "CFP", "RETFound-MAE, Shanghai colour fundus photographs"),
        _retfound_dinov2("RETFound_dinov2_meh", "RETFound-DINOv2, Moorfields colour fundus photographs"),
        _retfound_dinov2("RETFound_dinov2_shanghai", "RETFound-DINOv2, Shanghai colour fundus photographs"),
        _visionfm("Fundus", "CFP"),
        _visionfm("OCT", "OCT"),
        ModelSpec(
            name="UrFound", arch="vit_base_patch16_224", patch_size=16, modality="any", family="urfound",
            hf_repo="yyyyk/UrFound", hf_filename="urfound_mm.pth", global_pool="avg", licence="MIT",
            description="UrFound ViT-B/16, CFP and OCT with knowledge-guided masked modelling (MICCAI 2024)",
        ),
        _retfiner("RETFound", "R", "vit_large_patch16_224", "avg", "RETFound-MAE ViT-L/16"),
        _retfiner("VisionFM", "V", "vit_base_patch16_224", "token", "VisionFM OCT ViT-B/16",
                  mean=VISIONFM_STATS["OCT"][0], std=VISIONFM_STATS["OCT"][1]),
        _retfiner("UrFound", "U", "vit_base_patch16_224", "avg", "UrFound ViT-B/16"),
        _dinov2("s", "vit_small_patch14_dinov2"),
        _dinov2("b", "vit_base_patch14_dinov2"),
        _dinov2("l", "vit_large_patch14_dinov2"),
        _dinov2("g", "vit_giant_patch14_dinov2"),
        _dinov3("s", "vit_small_patch16_dinov3"),
        _dinov3("splus", "vit_small_plus_patch16_dinov3"),
        _dinov3("b", "vit_base_patch16_dinov3"),
        _dinov3("l", "vit_large_patch16_dinov3"),
        _dinov3("hplus", "vit_huge_plus_patch16_dinov3"),
        _dinov3("7b", "vit_7b_patch16_dinov3"),
        _plain("vit_large_patch16", "vit_large_patch16_224", "RETFound's architecture (ViT-L/16), no weights"),
        _plain("vit_base_patch16", "vit_base_patch16_224", "ViT-B/16, no weights"),
        _plain("vit_small_patch16", "vit_small_patch16_224", "ViT-S/16, no weights; CPU work"),
        _plain("vit_tiny_patch16", "vit_tiny_patch16_224", "ViT-Ti/16, no weights; CPU work"),
        _plain(
            "vit_micro_patch8", "vit_tiny_patch16_224", "4-block 64-wide ViT/8 at 64 px; demo and tests",
            input_size=64, patch=8, patch_size=8, embed_dim=64, depth=4, num_heads=4,
        ),
    ]
}


class RepeatedLayerNorm(nn.LayerNorm):
    """A LayerNorm applied `repeats` times with one set of weights (state-dict keys unchanged).

    RETFound's 2025 fine-tuning code under timm 0.9 normalises the pooled feature twice: its own
    forward_features applies fc_norm and timm's forward_head applies it again. Models imported
    from that code keep the second pass so their outputs are identical.
    """

    repeats: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            x = super().forward(x)
        return x


def repeat_fc_norm(model: nn.Module, repeats: int) -> None:
    """Make `model.fc_norm` (a LayerNorm) apply `repeats` times."""
    if repeats == 1:
        return
    norm = getattr(model, "fc_norm", None)
    if not isinstance(norm, nn.LayerNorm) or repeats < 1:
        raise ValueError(f"fc_norm_repeats={repeats} needs a model with a LayerNorm fc_norm (global average pooling)")
    repeated = RepeatedLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    repeated.load_state_dict(norm.state_dict())
    repeated.repeats = repeats
    model.fc_norm = repeated


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_spec(name: str) -> ModelSpec:
    """A zoo entry by name, or a spec for any timm ViT architecture name."""
    if name in ZOO:
        return ZOO[name]
    lowered = {k.lower(): k for k in ZOO}
    if name.lower() in lowered:
        return ZOO[lowered[name.lower()]]
    if name in timm.list_models():
        cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
        size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        patch = _patch_size_of(name)
        family = "dinov2" if "dinov2" in name else "dinov3" if "dinov3" in name else "timm"
        # DINOv2 defaults to 518 px in timm; train at 224 unless asked.
        return ModelSpec(name=name, arch=name, input_size=min(size, 224) if family != "timm" else size,
                         patch_size=patch, family=family)
    close = [k for k in ZOO if name.lower()[:6] in k.lower()]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: not in the zoo (see `retinafm models`) nor a timm architecture.{hint}"
    )


def check_input_size(model: str, requested: int | None) -> None:
    """The model and input-size checks of a training run, before it claims its folder or reads data
    (the run repeats them when it builds the model, and warns about a large size then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_spec(model).input_size_for(requested)


def _patch_size_of(arch: str) -> int:
    import re

    match = re.search(r"patch(\d+)", arch)
    return int(match.group(1)) if match else 16


def create_model(
    spec: ModelSpec,
    num_classes: int,
    *,
    input_size: int | None = None,
    drop_path: float = 0.0,
    global_pool: str | None = None,
    head: HeadSettings | None = None,
    fc_norm_repeats: int = 1,
) -> nn.Module:
    """Build the backbone with a fresh `num_classes`-output head (linear unless `head` says
    otherwise); weights are loaded separately. `fc_norm_repeats` reproduces RETFound-trained
    models (see RepeatedLayerNorm)."""
    kwargs = dict(spec.arch_kwargs)
    # Every model is built here, from flags or from a checkpoint's metadata: the size is checked once more.
    kwargs.update(pretrained=False, num_classes=num_classes, img_size=spec.input_size_for(input_size, "input size"),
                  drop_path_rate=drop_path)
    pool = global_pool or spec.global_pool
    if pool:
        kwargs["global_pool"] = pool
    model = timm.create_model(spec.arch, **kwargs)
    if head is not None and head.kind != "linear":
        attach_head(model, head, num_classes)
    repeat_fc_norm(model, fc_norm_repeats)
    return model


def zoo_table() -> list[dict[str, str]]:
    return [
        {
            "name": s.name,
            "architecture": s.arch,
            "input": str(s.input_size),
            "modality": s.modality,
            "weights": s.weight_source,
            "licence": s.licence,
        }
        for s in ZOO.values()
    ]

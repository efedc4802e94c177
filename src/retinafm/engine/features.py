"""Pooled backbone features: the model `embed` runs and the backbone a probe checkpoint refers to."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from retinafm.data.sources import DataSourceError
from retinafm.data.transforms import EVAL_CROP_PCT, Preprocessing
from retinafm.engine.checkpoint import CheckpointError, load_checkpoint, meta_of
from retinafm.engine.inference import load_model
from retinafm.models.onnx import OnnxModel
from retinafm.settings import EmbedSettings

POOLS = {"cls": "token", "avg": "avg"}  # --pool -> timm's global_pool
DTYPES = {"float16": np.float16, "float32": np.float32}


# --------------------------------------------------------------------------- which features
class PooledFeatures(nn.Module):
    """A timm ViT's pooled, normalised features: what its head sees (RETFound's linear-probe input)."""

    def __init__(self, model: nn.Module, tta_flip: bool = False):
        super().__init__()
        self.model, self.tta_flip = model, tta_flip

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, OnnxModel):  # the exported graph's own features output
            return self.model.features(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        if self.tta_flip:
            out = (out + self.features(torch.flip(x, dims=[-1]))) / 2
        return out


def embedding_model(settings: EmbedSettings) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone (eval mode) and its image recipe and provenance for the file's metadata."""
    from retinafm.models.registry import create_model, get_spec
    from retinafm.models.weights import load_backbone_weights, resolve_weights

    if settings.checkpoint is not None:
        model, meta = load_model(settings.checkpoint)
        pool = str(model.global_pool)
        if settings.pool is not None and POOLS[settings.pool] != pool:
            raise DataSourceError(f"--pool {settings.pool}: {settings.checkpoint} was trained with the "
                                  f"{'class token' if pool == 'token' else 'average'} pool; its features are that one")
        if settings.input_size is not None and settings.input_size != meta.input_size:
            raise DataSourceError(f"--input-size {settings.input_size}: {settings.checkpoint} takes "
                                  f"{meta.input_size} px")
        recipe = dict(input_size=meta.input_size, mean=list(meta.mean), std=list(meta.std), crop_pct=meta.eval_crop_pct,
                      preprocess=Preprocessing.from_state(meta.preprocess).state())
        source = dict(checkpoint=str(Path(settings.checkpoint).resolve()), model=meta.model_name, arch=meta.arch,
                      class_names=list(meta.class_names), task=meta.task, modality=meta.modality)
    else:
        spec = get_spec(settings.model)
        input_size = settings.input_size or spec.input_size
        if input_size % spec.patch_size:
            raise DataSourceError(f"--input-size {input_size} must be a multiple of {spec.name}'s patch size "
                                  f"{spec.patch_size}")
        path = resolve_weights(spec, settings.weights)
        # A random backbone (--weights none) is seeded, so a probe fitted on its features can rebuild it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(spec, 0, input_size=input_size,
                                 global_pool=POOLS[settings.pool] if settings.pool else None)
        if path is not None:
            load_backbone_weights(model, path, spec.family)
        pool = str(model.global_pool)
        recipe = dict(input_size=input_size, mean=list(spec.mean), std=list(spec.std), crop_pct=EVAL_CROP_PCT,
                      preprocess=Preprocessing(settings.fundus_crop, settings.oct_crop).state())
        source = dict(model=spec.name, arch=spec.arch, weights=settings.weights if path is not None else "none",
                      weights_file=path, modality=spec.modality)
    info = {**source, **recipe, "pool": "cls" if pool == "token" else pool, "tta_flip": settings.tta_flip,
            "cpu_int8": settings.cpu_int8,
            "dtype": settings.dtype}
    return model.eval(), info


def backbone_fields(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor] | None]:
    """From an embeddings file's metadata: the CheckpointMeta fields describing its backbone, the
    reference to its weights, and (for a random-init backbone, which has no reference) its weights."""
    from retinafm.models.registry import get_spec

    if info.get("checkpoint"):
        if str(info["checkpoint"]).endswith(".onnx"):
            raise CheckpointError(
                f"these embeddings come from the ONNX export {info['checkpoint']}, which a probe checkpoint cannot "
                "rebuild in PyTorch; embed with the .pth checkpoint it was exported from to fit a probe")
        source = meta_of(load_checkpoint(info["checkpoint"]))
        keep = ("arch", "arch_kwargs", "input_size", "mean", "std", "global_pool", "modality", "patch_size",
                "fc_norm_repeats", "eval_crop_pct", "preprocess")
        fields = {k: getattr(source, k) for k in keep}
        fields.update(model_name=source.model_name, tta_flip=bool(info.get("tta_flip")))
        return fields, {"checkpoint": str(info["checkpoint"])}, None
    if not info.get("model"):
        raise CheckpointError("the embeddings file does not say which model made it (no 'model' in its metadata); "
                              "re-create it with `retinafm embed`")
    spec = get_spec(info["model"])
    fields = dict(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs),
                  input_size=int(info["input_size"]), mean=list(info["mean"]), std=list(info["std"]),
                  global_pool="token" if info["pool"] == "cls" else "avg",
                  modality=spec.modality, patch_size=spec.patch_size, eval_crop_pct=float(info["crop_pct"]),
                  tta_flip=bool(info.get("tta_flip")), preprocess=dict(info.get("preprocess") or {}))
    if info.get("weights_file"):
        return fields, {"model": spec.name, "weights": info.get("weights"), "weights_file": info["weights_file"]}, None
    model, _ = embedding_model(EmbedSettings(model=spec.name, weights="none", pool=info["pool"],
                                             input_size=int(info["input_size"])))
    return fields, {}, {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}

"""`retinafm import --from retfound`: a model fine-tuned with RETFound's own code, as a retinafm checkpoint.

RETFound's main_finetune.py saves {'model': state_dict, 'epoch', 'args': argparse.Namespace}. Its
models are timm ViTs with the same parameter names as ours; what differs is the forward pass,
which this module reproduces exactly:

- `vit_large_patch16` (2023 code, timm 0.3.2), global pool: head(fc_norm(mean of patch tokens)).
- `RETFound_mae` (2025 code, timm 0.9), global pool: its forward_features returns
  fc_norm(mean of patch tokens) and timm's forward_head applies fc_norm again, so
  head(fc_norm(fc_norm(mean))). The checkpoint records fc_norm_repeats=2.
- either, with --cls_token (global_pool False): head(norm(tokens)[cls]).
- `RETFound_dinov2`: timm's vit_large_patch14_dinov2 at 224 px with its default class-token pool.

RETFound evaluates after resizing to input_size / crop_pct and centre-cropping, with crop_pct
224/256 up to 224 px and 1.0 above; classes are torchvision ImageFolder's sorted folder names.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retinafm.engine.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from retinafm.engine.inference import model_from_checkpoint
from retinafm.files import claim_file
from retinafm.models.registry import IMAGENET_MEAN, IMAGENET_STD
from retinafm.models.weights import WeightsError, read_checkpoint
from retinafm.tasks import MulticlassTask

# args.model of RETFound's code -> how many times its forward applies fc_norm with global pooling
MAE_MODELS = {"vit_large_patch16": 1, "RETFound_mae": 2}
DINOV2_MODELS = {"RETFound_dinov2"}
HEAD_DIM = 64  # every timm ViT of these families uses 64-wide attention heads; the weights do not say


class RetfoundImportError(CheckpointError):
    """A file that is not a RETFound fine-tuned checkpoint, or --classes that do not fit it."""


@dataclass(frozen=True)
class ImportResult:
    model_name: str
    arch: str
    class_names: list[str]
    input_size: int
    out: Path
    variant: str


def import_retfound(checkpoint: str | Path, class_names: Sequence[str], out: str | Path, *,
                    overwrite: bool = False) -> ImportResult:
    """Write `out`, a retinafm checkpoint with the forward pass of RETFound's fine-tuned `checkpoint`."""
    checkpoint, out = Path(checkpoint), Path(out)
    with claim_file(out, overwrite=overwrite, inputs=[("CHECKPOINT", checkpoint)], option="--out"):
        return _import(checkpoint, class_names, out)


def _import(checkpoint: Path, class_names: Sequence[str], out: Path) -> ImportResult:
    try:
        raw = read_checkpoint(checkpoint)
    except WeightsError as exc:
        raise RetfoundImportError(str(exc)) from None
    state = raw.get("model")
    if not isinstance(state, dict) or "head.weight" not in state:
        raise RetfoundImportError(
            f"{checkpoint} is not a checkpoint fine-tuned by RETFound's main_finetune.py (no 'model' with "
            "'head.weight'); for pretrained RETFound weights use `retinafm finetune --weights` instead")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    args = _args_of(raw)
    model = str(args.get("model", ""))
    classes = [str(c) for c in class_names]
    outputs = int(state["head.weight"].shape[0])
    if len(classes) != outputs:
        raise RetfoundImportError(f"--classes names {len(classes)} class(es) but the head of {checkpoint} has "
                                  f"{outputs} outputs; list them in the head's order (RETFound: the sorted class "
                                  "folder names)")
    if len(set(classes)) != len(classes):
        raise RetfoundImportError(f"--classes has duplicate names: {classes}")

    if model in DINOV2_MODELS or (not model and any(".ls1." in k for k in state)):
        meta_fields, variant = _dinov2_layout(state, checkpoint), "RETFound_dinov2, class token"
    elif model in MAE_MODELS or not model:
        meta_fields, variant = _mae_layout(state, model, checkpoint)
    else:
        raise RetfoundImportError(f"{checkpoint} was trained as {model!r}; importable RETFound models are "
                           f"{', '.join([*MAE_MODELS, *DINOV2_MODELS])}")
    input_size = meta_fields["input_size"]
    task = MulticlassTask(tuple(classes))  # RETFound fine-tunes softmax classifiers
    meta = CheckpointMeta(
        model_name=f"{model or 'vit_large_patch16'} (RETFound import)", task=task.name, class_names=classes,
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), modality="any", task_state=task.state(),
        epoch=raw["epoch"] if isinstance(raw.get("epoch"), int) else -1,
        eval_crop_pct=224 / 256 if input_size <= 224 else 1.0,
        settings={"imported_from": str(checkpoint.resolve()), "variant": variant, "retfound_args": args},
        **meta_fields,
    )
    rebuilt = _rebuild(meta, state, checkpoint)
    save_checkpoint(out, rebuilt, meta)
    return ImportResult(meta.model_name, meta.arch, classes, input_size, out, variant)


def _args_of(raw: dict[str, Any]) -> dict[str, Any]:
    """RETFound's argparse settings as plain values (the checkpoint must load with weights_only)."""
    args = raw.get("args")
    values = vars(args) if args is not None and hasattr(args, "__dict__") else dict(args or {})
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _grid(state: dict[str, torch.Tensor], patch: int, prefix_tokens: int, checkpoint: Path) -> int:
    """Input size from the position embedding: the grid RETFound built the model for."""
    tokens = int(state["pos_embed"].shape[1]) - prefix_tokens
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise RetfoundImportError(f"{checkpoint}: pos_embed has {tokens} patch positions, not a square grid")
    return side * patch


def _shape_kwargs(state: dict[str, torch.Tensor], reference: dict[str, Any]) -> dict[str, Any]:
    """embed_dim, depth, heads, mlp ratio and patch size read off the weights, kept only where
    they differ from the named timm architecture (so real checkpoints keep plain arch names)."""
    embed = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else None
    shape = {"embed_dim": embed, "depth": depth, "num_heads": max(1, embed // HEAD_DIM),
             "patch_size": int(state["patch_embed.proj.weight"].shape[-1])}
    if hidden is not None:
        shape["mlp_ratio"] = hidden / embed
    return {k: v for k, v in shape.items() if reference.get(k) != v}


def _mae_layout(state: dict[str, torch.Tensor], model: str, checkpoint: Path) -> tuple[dict[str, Any], str]:
    global_pool = "fc_norm.weight" in state
    if not global_pool and "norm.weight" not in state:
        raise RetfoundImportError(f"{checkpoint} has neither fc_norm nor norm weights; it is not a RETFound ViT")
    kwargs = _shape_kwargs(state, {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16,
                                   "mlp_ratio": 4.0})
    patch = kwargs.get("patch_size", 16)
    # Unknown code version (no args.model): the 2023 single-norm forward, as MAE's own code.
    repeats = MAE_MODELS.get(model, 1) if global_pool else 1
    variant = f"{model or 'vit_large_patch16'}, {'global average pool' if global_pool else 'class token'}"
    return dict(arch="vit_large_patch16_224", arch_kwargs=kwargs, input_size=_grid(state, patch, 1, checkpoint),
                global_pool="avg" if global_pool else "token", patch_size=patch, fc_norm_repeats=repeats), variant


def _dinov2_layout(state: dict[str, torch.Tensor], checkpoint: Path) -> dict[str, Any]:
    kwargs = _shape_kwargs(state, {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 14,
                                   "mlp_ratio": 4.0})
    patch = kwargs.get("patch_size", 14)
    return dict(arch="vit_large_patch14_dinov2", arch_kwargs=kwargs,
                input_size=_grid(state, patch, 1, checkpoint), global_pool="token", patch_size=patch,
                fc_norm_repeats=1)


def _rebuild(meta: CheckpointMeta, state: dict[str, torch.Tensor], checkpoint: Path) -> torch.nn.Module:
    """Build the retinafm model and load RETFound's weights strictly (nothing left over, nothing new)."""
    try:
        model, _ = model_from_checkpoint({"model": state, "retinafm": dict(meta.__dict__)})
    except CheckpointError as exc:
        raise RetfoundImportError(f"{checkpoint}: the weights do not fit the RETFound architecture they claim: "
                           f"{str(exc)[:400]}") from None
    return model

"""One-file checkpoints: the state dict under 'model' plus plain-typed metadata.

`torch.load(path, weights_only=True)` opens them, and `predict` needs nothing else: the file says
which architecture to build, the classes in order, and the image recipe.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from retinafm.data.transforms import EVAL_CROP_PCT
from retinafm.files import save_torch
from retinafm.models.registry import ModelSpec

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A file that is not a retinafm checkpoint, or one that does not fit."""


@dataclass
class CheckpointMeta:
    """What a checkpoint needs to rebuild and run its model, all plain Python types."""

    model_name: str
    arch: str
    arch_kwargs: dict[str, Any]
    task: str
    class_names: list[str]  # output names: classes, labels or targets, in output order
    input_size: int
    mean: list[float]
    std: list[float]
    global_pool: str
    modality: str
    patch_size: int
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = -1
    task_state: dict[str, Any] = field(default_factory=dict)  # thresholds, target statistics...
    head: dict[str, Any] = field(default_factory=dict)  # HeadSettings fields; empty: linear
    fc_norm_repeats: int = 1  # 2 for models imported from RETFound's 2025 code (see RepeatedLayerNorm)
    eval_crop_pct: float = EVAL_CROP_PCT  # evaluation resize = input_size / eval_crop_pct, then centre crop
    # Probes: where the frozen backbone's weights come from ({"checkpoint": path} or {"model", "weights",
    # "weights_file"}); the file then holds only the head. Empty: the file holds every weight.
    backbone: dict[str, Any] = field(default_factory=dict)
    # A probe fitted on flip-averaged embeddings: its linear head on averaged features equals the
    # average of its logits on the image and its mirror, which is how the rebuilt model predicts.
    tta_flip: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)  # Preprocessing fields (fundus crop, OCT crop)

    def spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.model_name, arch=self.arch, input_size=self.input_size, patch_size=self.patch_size,
            modality=self.modality, global_pool=self.global_pool, mean=tuple(self.mean), std=tuple(self.std),
            arch_kwargs=dict(self.arch_kwargs),
        )


def versions() -> dict[str, str]:
    import timm

    from retinafm import __version__

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {"retinafm": str(__version__), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "python": platform.python_version()}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers, so keys stay RETFound-compatible."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: CheckpointMeta,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    state = _state(meta, {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if extra:
        state.update(extra)
    return save_torch(path, state)


def _state(meta: CheckpointMeta, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"model": weights, "retinafm": {"format": FORMAT_VERSION, **meta.__dict__, "versions": versions()}}


def save_probe_checkpoint(path: str | Path, meta: CheckpointMeta, head: dict[str, torch.Tensor],
                          backbone_state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """A probe's checkpoint: its head, plus the backbone's weights only when meta.backbone cannot
    name where they come from (a randomly initialised backbone)."""
    return save_torch(path, _state(meta, {**(backbone_state or {}), **head}))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Open a retinafm checkpoint with weights_only=True; anything else gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be opened as a retinafm checkpoint ({str(exc).splitlines()[0][:200]}); "
            "checkpoints are the checkpoint-best.pth / checkpoint-last.pth files of a run directory."
        ) from None
    if not isinstance(state, dict) or "retinafm" not in state or "model" not in state:
        raise CheckpointError(
            f"{path} is not a retinafm checkpoint (no 'retinafm' metadata). For pretrained backbones "
            "use `retinafm finetune --weights`."
        )
    return state


def meta_of(state: dict[str, Any]) -> CheckpointMeta:
    info = {k: v for k, v in state["retinafm"].items() if k in CheckpointMeta.__dataclass_fields__}
    return CheckpointMeta(**info)

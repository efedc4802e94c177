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

from ..config import ConfigError
from ..data.transforms import EVAL_CROP_PCT
from ..files import prepare_output_dir, save_torch
from ..models.heads import HeadSettings
from ..models.registry import ModelSpec, create_model

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


def open_run_dir(out: str | Path, *, resume: bool, overwrite: bool) -> tuple[Path, Path]:
    """A training run's directory (created by rank 0; an existing run is refused unless resuming or
    overwriting) and its checkpoint-last.pth, which --resume needs."""
    from . import distributed as dist_utils

    run_dir = Path(out)
    last_path = run_dir / "checkpoint-last.pth"
    if resume and not last_path.is_file():
        raise ConfigError(f"--resume: {last_path} does not exist; start a new run without --resume")
    if dist_utils.is_primary():
        prepare_output_dir(run_dir, overwrite=overwrite, resume=resume)
    dist_utils.barrier()
    return run_dir, last_path


def begin_run(out: str | Path, *, device: str, resume: bool, overwrite: bool, seed: int) -> tuple[torch.device, Path, Path]:
    """The device (joining torchrun's process group if launched by it), the run directory and its
    checkpoint-last.pth (see open_run_dir), with every RNG seeded per rank."""
    from . import distributed as dist_utils
    from .runtime import resolve_device, seed_everything

    dev = resolve_device(device)
    dist_utils.init_distributed(dev)
    run_dir, last_path = open_run_dir(out, resume=resume, overwrite=overwrite)
    seed_everything(seed + dist_utils.rank())
    return dev, run_dir, last_path


def restore_training(state: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     run_dir: Path, start_epoch: int) -> list[dict[str, Any]]:
    """Put a checkpoint-last's optimiser, gradient scaler and random state back; returns the run's
    log rows before `start_epoch` (the resumed run rewrites the rest)."""
    import pandas as pd

    from .runtime import restore_rng_state

    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state)
    if not (run_dir / "log.csv").is_file():
        return []
    return pd.read_csv(run_dir / "log.csv").query("epoch < @start_epoch").to_dict("records")


def versions() -> dict[str, str]:
    import timm

    from .. import __version__

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


def backbone_fields(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Optional[dict[str, torch.Tensor]]]:
    """From an embeddings file's metadata: the CheckpointMeta fields describing its backbone, the
    reference to its weights, and (for a random-init backbone, which has no reference) its weights."""
    from ..models.registry import get_spec

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
    fields = dict(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), input_size=int(info["input_size"]),
                  mean=list(info["mean"]), std=list(info["std"]), global_pool="token" if info["pool"] == "cls" else "avg",
                  modality=spec.modality, patch_size=spec.patch_size, eval_crop_pct=float(info["crop_pct"]),
                  tta_flip=bool(info.get("tta_flip")), preprocess=dict(info.get("preprocess") or {}))
    if info.get("weights_file"):
        return fields, {"model": spec.name, "weights": info.get("weights"), "weights_file": info["weights_file"]}, None
    from ..embed import EmbedSettings, embedding_model

    model, _ = embedding_model(EmbedSettings(model=spec.name, weights="none", pool=info["pool"],
                                             input_size=int(info["input_size"])))
    return fields, {}, {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def _load_backbone_reference(model: nn.Module, reference: dict[str, Any]) -> None:
    """Fill a probe's backbone from the checkpoint or pretrained weights it was fitted on."""
    if reference.get("checkpoint"):
        path = Path(reference["checkpoint"])
        if not path.is_file():
            raise CheckpointError(f"this probe was fitted on the features of {path}, which is missing; put it back "
                                  "or re-run the probe")
        source, _ = model_from_checkpoint(load_checkpoint(path))
        weights = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys or any(not k.startswith("head.") for k in result.missing_keys):
            raise CheckpointError(f"the backbone of {path} does not fit this probe's architecture")
        return
    from ..models.registry import get_spec
    from ..models.weights import load_backbone_weights, resolve_weights

    spec = get_spec(reference["model"])
    file = reference.get("weights_file")
    path = file if file and Path(file).is_file() else resolve_weights(spec, reference.get("weights"))
    if path is None:
        raise CheckpointError(f"this probe's backbone {spec.name} has no weights to load")
    load_backbone_weights(model, path, spec.family)


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


def eval_transform_of(meta: CheckpointMeta):
    """The evaluation recipe a checkpoint's model expects, its preprocessing included."""
    from ..data.transforms import Preprocessing, eval_transform

    return eval_transform(meta.input_size, meta.mean, meta.std, meta.eval_crop_pct,
                          Preprocessing.from_state(meta.preprocess))


def task_of(meta: CheckpointMeta):
    """The checkpoint's task with its saved thresholds / target statistics."""
    from ..tasks import make_task

    return make_task(meta.task, meta.class_names, **meta.task_state)


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the architecture from the metadata and load the weights strictly."""
    meta = meta_of(state)
    model = create_model(meta.spec(), len(meta.class_names), input_size=meta.input_size, global_pool=meta.global_pool,
                         head=HeadSettings(**meta.head) if meta.head else None, fc_norm_repeats=meta.fc_norm_repeats)
    try:
        if meta.backbone:  # a probe: backbone from its reference, then the head
            _load_backbone_reference(model, meta.backbone)
            result = model.load_state_dict(state["model"], strict=False)
            if result.unexpected_keys or set(state["model"]) != {k for k in model.state_dict() if k.startswith("head.")}:
                raise RuntimeError(f"head weights {sorted(state['model'])} do not fit")
        else:
            model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit {meta.arch}: {str(exc)[:500]}") from None
    if meta.tta_flip:
        model.forward = _flip_averaged(model.forward)
    model.eval()
    return model, meta


def _flip_averaged(forward):
    def averaged(x: torch.Tensor) -> torch.Tensor:
        return (forward(x) + forward(torch.flip(x, dims=[-1]))) / 2

    return averaged

"""One checkpoint layout for every kind of run: the state dict under 'model' plus plain-typed
metadata under 'retinafm' with a `kind` and a format version.

    {"model": {...}, "retinafm": {"format": 2, "kind": "classifier" | "probe" | "pretrain" | "refine", ...}}

A run's checkpoint-last.pth adds its training state at the top level (optimizer, scaler, epoch,
every RNG state, the best-so-far bookkeeping). `torch.load(path, weights_only=True)` opens every
file, and `predict` needs nothing else for a classifier: the file says which architecture to
build, the classes in order, and the image recipe.

What 'model' holds per kind, so the weight adapters of models/weights.py read these files as
`--weights` / `--init` by their keys: a classifier's or probe's timm model; MAE's encoder + decoder
in RETFound-MAE's layout; DINO's `student.` / `teacher.` networks (`backbone.` + `head.`) and
`loss_fn.center`; refinement's `vision.` / `text.` towers and heads.

Files written before the format had a version (format 1 under "retinafm" without a kind, and the
pretraining / refinement files under "retinafm_pretrain" / "retinafm_refine") are upgraded in
memory by `upgrade`, so they keep loading everywhere.
"""
from __future__ import annotations

import math
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from retinafm.data.transforms import EVAL_CROP_PCT
from retinafm.files import save_torch
from retinafm.files.inputs import CHECKPOINT_MAX_BYTES, InputFileError, check_torch_zip, open_regular
from retinafm.models.registry import ModelSpec
from retinafm.models.weights import non_finite_message, non_finite_tensors

FORMAT_VERSION = 2
KINDS = ("classifier", "probe", "pretrain", "refine")
MODEL_KINDS = ("classifier", "probe")  # the kinds predict / evaluate / export / embed --checkpoint run
# Where today's pretraining and refinement files kept their metadata, before the one layout.
LEGACY_META_KEYS = {"retinafm_pretrain": "pretrain", "retinafm_refine": "refine"}


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
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A classifier's checkpoint (kind "classifier"); `optimizer`, `scaler` and `extra` are the
    training state a checkpoint-last.pth adds."""
    training = dict(extra or {})
    if optimizer is not None:
        training["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        training["scaler"] = scaler.state_dict()
    return write_checkpoint(path, model_weights(model), "classifier", dict(meta.__dict__), training)


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bare model's state dict on the CPU (keys without DDP / compile prefixes)."""
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def checkpoint_state(weights: dict[str, torch.Tensor], kind: str, meta: dict[str, Any],
                     training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one layout: weights under 'model', metadata with kind and format under 'retinafm', then
    any training state (optimizer, scaler, epoch, RNG) at the top level."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    info = {"format": FORMAT_VERSION, "kind": kind, **meta}
    info.setdefault("versions", versions())
    return {"model": weights, "retinafm": info, **(training or {})}


def write_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], kind: str, meta: dict[str, Any],
                     training: dict[str, Any] | None = None) -> Path:
    """Write `checkpoint_state(...)` atomically."""
    return save_torch(path, checkpoint_state(weights, kind, meta, training))


def _state(meta: CheckpointMeta, weights: dict[str, torch.Tensor], kind: str = "classifier") -> dict[str, Any]:
    return checkpoint_state(weights, kind, dict(meta.__dict__))


def save_probe_checkpoint(path: str | Path, meta: CheckpointMeta, head: dict[str, torch.Tensor],
                          backbone_state: dict[str, torch.Tensor] | None = None) -> Path:
    """A probe's checkpoint: its head, plus the backbone's weights only when meta.backbone cannot
    name where they come from (a randomly initialised backbone)."""
    return save_torch(path, _state(meta, {**(backbone_state or {}), **head}, kind="probe"))


def kind_of(state: dict[str, Any]) -> str:
    """The kind of an upgraded checkpoint (a format-1 file without one: a probe when it names its
    backbone's source, else a classifier)."""
    info = state["retinafm"]
    return info.get("kind") or ("probe" if info.get("backbone") else "classifier")


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Any layout retinafm has written, as the current one (a new dict; tensors are shared).

    Format 1 classifier / probe files only gain their kind. Pretraining files move their metadata
    from "retinafm_pretrain" (and DINO's "student" / "teacher" / "dino_loss" into 'model' under
    `student.` / `teacher.` / `loss_fn.`); refinement files from "retinafm_refine". Their top-level
    epoch, optimizer, scaler and RNG state stay where they were, which is where the format keeps them.
    """
    state = dict(state)
    if isinstance(state.get("retinafm"), dict):
        info = dict(state["retinafm"])
        info.setdefault("format", 1)
        info["kind"] = kind_of({"retinafm": info})
        state["retinafm"] = info
        if "epoch" not in state and "optimizer" in state and "epoch" in info:
            state["epoch"] = info["epoch"]  # format 1 classifiers kept the epoch in their metadata only
        return state
    for key, kind in LEGACY_META_KEYS.items():
        if isinstance(state.get(key), dict):
            state["retinafm"] = {"format": 1, "kind": kind, **state.pop(key)}
            if "student" in state and "model" not in state:
                model: dict[str, torch.Tensor] = {}
                for part, prefix in (("student", "student."), ("teacher", "teacher."), ("dino_loss", "loss_fn.")):
                    model.update({prefix + k: v for k, v in state.pop(part, {}).items()})
                state["model"] = model
            return state
    return state


def open_checkpoint(path: str | Path, option: str = "--checkpoint") -> dict[str, Any]:
    """Any retinafm checkpoint (every kind, every format), upgraded to the current layout."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{option} {path}: no such file")
    try:
        # A regular file within the size limit; a zip whose members would inflate far beyond the
        # file is refused from its central directory before torch.load decompresses anything.
        with open_regular(path, what=option, max_bytes=CHECKPOINT_MAX_BYTES, kind="checkpoints",
                          hint="give a checkpoint-best.pth / checkpoint-last.pth file of a run directory") as fh:
            check_torch_zip(fh, what=option, path=path)
            state = torch.load(fh, map_location="cpu", weights_only=True)
    except InputFileError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{option} {path} cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be opened as a retinafm checkpoint ({str(exc).splitlines()[0][:200]}); "
            "checkpoints are the checkpoint-best.pth / checkpoint-last.pth files of a run directory."
        ) from None
    state = upgrade(state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not isinstance(state.get("retinafm"), dict) or "model" not in state:
        raise CheckpointError(
            f"{path} is not a retinafm checkpoint (no 'retinafm' metadata). For pretrained backbones "
            "use `retinafm finetune --weights`."
        )
    check_class_names(state["retinafm"].get("class_names"), f"{option} {path}")
    weights = state["model"] if isinstance(state["model"], dict) else {}
    bad = non_finite_tensors(weights)
    if bad:
        raise CheckpointError(f"{option} {path}: {non_finite_message(bad)}; its model would predict NaN. The run "
                              "that wrote it diverged: retrain (e.g. a lower --lr) or use an earlier checkpoint.")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Open a checkpoint that holds a runnable model (a classifier or a probe) with weights_only=True;
    anything else gets a clear error."""
    state = open_checkpoint(path)
    kind = kind_of(state)
    if kind not in MODEL_KINDS:
        raise CheckpointError(
            f"{path} is not a retinafm checkpoint of a fine-tuned model but a {kind} checkpoint. For pretrained "
            "backbones use `retinafm finetune --weights`."
        )
    return state


def meta_of(state: dict[str, Any]) -> CheckpointMeta:
    """The metadata of an (upgraded) checkpoint or exported model. Output names must be distinct:
    two classes of one name would become one column of every table (and one bar of every plot)."""
    info = {k: v for k, v in state["retinafm"].items() if k in CheckpointMeta.__dataclass_fields__}
    check_class_names(info.get("class_names"), "the model's metadata")
    bad = _non_finite(info.get("task_state"))
    if bad:  # NaN target statistics or thresholds would turn every prediction into NaN, or the wrong label
        raise CheckpointError(f"the model's task state holds NaN or infinite values ({', '.join(bad[:5])}); "
                              "the checkpoint is damaged: use another one, or train again")
    return CheckpointMeta(**info)


def _non_finite(value: Any, where: str = "task_state") -> list[str]:
    """The places in a (nested) task state whose numbers are NaN or infinite."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [] if math.isfinite(value) else [where]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _non_finite(item, f"{where}.{key}")]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _non_finite(item, f"{where}[{i}]")]
    return []


def check_class_names(names: Any, where: str) -> None:
    """Refuse output names that are not a list, or that repeat (two classes of one name would
    collapse into one column of every table the model's predictions go to)."""
    if names is None:
        return
    if not isinstance(names, (list, tuple)):
        raise CheckpointError(f"{where} holds class names that are not a list ({type(names).__name__})")
    repeated = [n for n, c in Counter(str(n) for n in names).items() if c > 1]
    if repeated:
        raise CheckpointError(f"{where} names class(es) {repeated[:5]} more than once ({len(names)} outputs); "
                              "each output needs its own name")

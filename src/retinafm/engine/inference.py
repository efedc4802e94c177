"""Checkpoints (.pth or exported .onnx) loaded for inference: the model, its task and its image recipe."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from retinafm.engine.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    meta_of,
)
from retinafm.files import CHECKPOINT_MAX_BYTES, InputFileError, check_regular
from retinafm.models.heads import HeadSettings
from retinafm.models.onnx import FEATURES, INPUT, LOGITS, META_KEY, OnnxModel
from retinafm.models.registry import create_model
from retinafm.runtime.cpu import quantize_for_cpu
from retinafm.runtime.device import inference_dtype, precision_name, resolve_device
from retinafm.settings import check_onnx_options, is_onnx

INSTALL_HINT = "pip install 'retinafm[onnx]' (onnx==1.23.2, onnxruntime==1.32.0)"


def _onnxruntime(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError(f"{path} is an ONNX model, and running it needs ONNX Runtime, which is not "
                              f"installed: {INSTALL_HINT}") from None
    return onnxruntime


def _session(path: Path):
    ort = _onnxruntime(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget torch was given
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT's notes on pruned initialisers are not the user's concern
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise CheckpointError(f"{path} cannot be opened as an ONNX model ({str(exc).splitlines()[0][:200]}); "
                              "a .onnx checkpoint is what `retinafm export` writes from a .pth checkpoint") from None


def load_onnx(path: str | Path) -> tuple[OnnxModel, CheckpointMeta]:
    """An exported model and the checkpoint metadata stored in it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: no such file")
    try:  # a FIFO, a device or an oversized file is refused before ONNX Runtime opens it
        check_regular(path, what="--checkpoint", max_bytes=CHECKPOINT_MAX_BYTES, kind="checkpoints")
    except InputFileError as exc:
        raise CheckpointError(str(exc)) from None
    session = _session(path)
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    names = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
    if raw is None or names != ({INPUT}, {LOGITS, FEATURES}):
        raise CheckpointError(f"{path} is an ONNX model but not one `retinafm export` wrote (no '{META_KEY}' "
                              "metadata, or other inputs and outputs); export the .pth checkpoint with "
                              "`retinafm export`")
    try:
        meta = meta_of({"retinafm": json.loads(raw)})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its '{META_KEY}' metadata cannot be read ({exc}); export it again") from None
    return OnnxModel(session, path, global_pool=meta.global_pool, tta_flip=meta.tta_flip), meta


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
    from retinafm.models.registry import get_spec
    from retinafm.models.weights import load_backbone_weights, resolve_weights

    spec = get_spec(reference["model"])
    file = reference.get("weights_file")
    path = file if file and Path(file).is_file() else resolve_weights(spec, reference.get("weights"))
    if path is None:
        raise CheckpointError(f"this probe's backbone {spec.name} has no weights to load")
    load_backbone_weights(model, path, spec.family)


def eval_transform_of(meta: CheckpointMeta):
    """The evaluation recipe a checkpoint's model expects, its preprocessing included."""
    from retinafm.data.transforms import Preprocessing, eval_transform

    return eval_transform(meta.input_size, meta.mean, meta.std, meta.eval_crop_pct,
                          Preprocessing.from_state(meta.preprocess))


def task_of(meta: CheckpointMeta):
    """The checkpoint's task with its saved thresholds / target statistics."""
    from retinafm.tasks import make_task

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
            head = {k for k in model.state_dict() if k.startswith("head.")}
            if result.unexpected_keys or set(state["model"]) != head:
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


# --------------------------------------------------------------------------- one way to load for inference
@dataclass
class LoadedModel:
    """A checkpoint ready to run: what predict, evaluate, embed and `retinafm.load` all work from."""

    model: nn.Module  # eval mode, on `device` (quantised under cpu_int8)
    meta: CheckpointMeta
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32 (always for ONNX and int8)
    precision: str  # what a run records: onnx | int8 | fp32 | bf16 | fp16
    onnx: bool
    transform: Callable  # the checkpoint's evaluation recipe, its fundus / OCT crop included
    task: Any = None  # the checkpoint's task with its saved thresholds / target statistics

    def check_modality(self, paths: Sequence[str], declared: str | None = None) -> str | None:
        """Warn when the images do not look like what the model was trained on."""
        from retinafm.data.preprocess import check_modality

        return check_modality(paths, self.meta.modality, self.meta.model_name, declared)


def prepare_for_inference(model: nn.Module, *, onnx: bool, device: str = "auto", precision: str = "auto",
                          cpu_int8: bool = False) -> tuple[nn.Module, torch.device, torch.dtype | None, str]:
    """A loaded model on its device, quantised if asked, with its autocast dtype and precision name.

    ONNX Runtime and int8 Linear layers run in their own precision; the rest autocasts per machine.
    Under torchrun the process group is joined here, once the device is known."""
    from retinafm.runtime import distributed as dist_utils

    dev = resolve_device("cpu" if onnx else device)
    dtype = None if onnx else inference_dtype(dev, precision, cpu_int8=cpu_int8)
    name = "onnx" if onnx else "int8" if cpu_int8 else precision_name(dtype)
    dist_utils.init_distributed(dev)
    if cpu_int8:
        model = quantize_for_cpu(model, dev)
    return model.to(dev).eval(), dev, dtype, name


def load_model(checkpoint: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    """The model (on the CPU, eval mode) and metadata of a .pth checkpoint or its .onnx export.
    The input size its metadata gives passes the one input-size check (ModelSpec.input_size_for)
    before a model is built or an image resized to it."""
    if is_onnx(checkpoint):
        model, meta = load_onnx(checkpoint)
        meta.spec().input_size_for(meta.input_size, f"{checkpoint}: its input size")
        return model, meta
    state = load_checkpoint(checkpoint)
    meta = meta_of(state)
    meta.spec().input_size_for(meta.input_size, f"{checkpoint}: its input size")
    return model_from_checkpoint(state)  # the loaded tensors are not kept twice


def load_for_inference(checkpoint: str | Path, *, device: str = "auto", precision: str = "auto",
                       cpu_int8: bool = False) -> LoadedModel:
    """A .pth checkpoint or its .onnx export (`retinafm export`), ready for predict, evaluate or embed.

    The options an exported model cannot take (a forced precision, --cpu-int8, a GPU) are refused
    before anything is loaded."""
    onnx = is_onnx(checkpoint)
    if onnx:
        check_onnx_options(checkpoint, device, cpu_int8, precision)
    model, meta = load_model(checkpoint)
    model, dev, dtype, name = prepare_for_inference(model, onnx=onnx, device=device, precision=precision,
                                                    cpu_int8=cpu_int8)
    return LoadedModel(model, meta, dev, dtype, name, onnx, eval_transform_of(meta), task_of(meta))

"""`retinafm export`: a checkpoint → one ONNX file that `predict` and `embed` run with ONNX Runtime.

The graph takes `images` (float32 N×3×H×W, any N) and returns `logits` (exactly what the
checkpoint's model returns, flip-averaged for a tta_flip probe) and `features` (the pooled
pre-logits features `embed` writes, of the image as given; `embed --tta-flip` averages them with
the mirror's like it does for a .pth). The checkpoint's metadata travels inside the file as JSON
under the key "retinafm", so the file alone is enough to predict.

The exporter is torch's TorchScript-based one (dynamo=False): on timm ViTs it matches the
torch.export-based default in accuracy and speed, traces faster and needs no onnxscript
(benchmarks/RESULTS.md, "Design notes").
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from retinafm.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    versions,
)
from retinafm.engine.inference import (
    INSTALL_HINT,
    load_onnx,
    model_from_checkpoint,
)
from retinafm.files import atomic_path, claim_file
from retinafm.models.onnx import FEATURES, INPUT, LOGITS, META_KEY
from retinafm.settings import ExportSettings, is_onnx

DEFAULT_OPSET = 17  # LayerNormalization as one op; what ONNX Runtime's transformer fusions are written against
FP32_TOLERANCE = 1e-3  # max |ONNX Runtime - PyTorch| on the parity inputs before an fp32 export is refused
# One protobuf holds at most 2 GiB; bigger models would need external weight files beside the .onnx.
MAX_WEIGHT_BYTES = 2**31 - 64 * 2**20


@dataclass
class ExportResult:
    out: Path
    seconds: float  # the whole export: tracing, int8 passes, writing and the parity check
    max_abs_diff_logits: float  # ONNX Runtime vs PyTorch on random inputs
    max_abs_diff_features: float
    int8: bool
    opset: int


# --------------------------------------------------------------------------- writing an export
class _ExportGraph(nn.Module):
    """One pass over the backbone for both outputs; the mirror pass only for a tta_flip model's logits."""

    def __init__(self, model: nn.Module, tta_flip: bool):
        super().__init__()
        self.model, self.tta_flip = model, tta_flip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(x)
        features = self.model.forward_head(tokens, pre_logits=True)
        logits = self.model.forward_head(tokens)
        if self.tta_flip:  # as checkpoint._flip_averaged does to the PyTorch model's forward
            logits = (logits + self.model.forward_head(self.model.forward_features(torch.flip(x, dims=[-1])))) / 2
        return logits, features


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the tracer's, the legacy exporter's and the quantiser's advice, none of which is the user's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _trace(graph: _ExportGraph, path: Path, input_size: int, opset: int) -> None:
    example = torch.zeros(2, 3, input_size, input_size)  # batch 2: a traced batch of 1 could be taken as constant
    batch = {0: "batch"}
    # nn.TransformerEncoder's inference fast path (transformer heads) is one fused op ONNX has no counterpart for.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(graph, (example,), str(path), input_names=[INPUT], output_names=[LOGITS, FEATURES],
                              dynamic_axes={INPUT: batch, LOGITS: batch, FEATURES: batch}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _quantize(fp32: Path, folder: Path, model: nn.Module) -> Path:
    """ONNX Runtime's ViT fusions (SkipLayerNormalization, BiasGelu), then int8 weights with
    activations quantised per batch: the fastest CPU path for a ViT (benchmarks/RESULTS.md)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    attn = getattr(getattr(model, "blocks", [None])[0], "attn", None)
    heads, width = int(getattr(attn, "num_heads", 0)), int(getattr(model, "embed_dim", 0))
    fused, int8 = folder / "fused.onnx", folder / "int8.onnx"
    with _quiet():
        optimize_model(str(fp32), model_type="vit", num_heads=heads, hidden_size=width).save_model_to_file(str(fused))
        # The fused graph lacks some shape information; untyped tensors are float32.
        quantize_dynamic(fused, int8, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return int8


def _metadata(meta: CheckpointMeta, *, checkpoint: Path, int8: bool, opset: int) -> str:
    import onnx
    import onnxruntime

    def plain(value: Any) -> Any:
        return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else str(value)

    return json.dumps({
        "format": FORMAT_VERSION, **meta.__dict__,
        "versions": {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "export": {"source": str(checkpoint.resolve()), "int8": int8, "opset": opset, "input": INPUT,
                   "outputs": [LOGITS, FEATURES]},
    }, default=plain)


def _parity(model: nn.Module, path: Path, input_size: int) -> tuple[float, float]:
    """Max |ONNX Runtime - PyTorch| of logits and features on a random batch of 2 (the file is
    read back through load_onnx, so its metadata is checked too)."""
    onnx_model, _ = load_onnx(path)
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)  # the checkpoint's own forward, flip averaging included
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    onnx_logits, onnx_features = onnx_model.session.run([LOGITS, FEATURES], {INPUT: x.numpy()})
    for name, values in (("PyTorch", logits.numpy()), ("PyTorch", features.numpy()), ("ONNX Runtime", onnx_logits),
                         ("ONNX Runtime", onnx_features)):
        if not np.isfinite(values).all():  # NaN compares false with any tolerance: it would pass unseen
            raise CheckpointError(f"the model gives NaN or infinite outputs under {name} on a test batch; its "
                                  "weights are unusable, so nothing was exported")
    return float(np.abs(onnx_logits - logits.numpy()).max()), float(np.abs(onnx_features - features.numpy()).max())


def export(settings: ExportSettings) -> ExportResult:
    """Write `settings.out` (.onnx): the checkpoint's model with its metadata, fp32 or (int8) with
    ONNX Runtime's transformer fusions and int8 weights. The file is checked against PyTorch before
    it is put in place; an fp32 export that differs by more than 1e-3 is refused."""
    settings.validate()
    int8, opset = settings.int8, settings.opset
    start = time.perf_counter()
    checkpoint, out = Path(settings.checkpoint), Path(settings.out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: name it *.onnx, which is how predict and embed recognise an exported model")
    with claim_file(out, overwrite=settings.overwrite, inputs=[("--checkpoint", checkpoint)]):
        return _export(checkpoint, out, int8, opset, start)


def _export(checkpoint: Path, out: Path, int8: bool, opset: int | None,
            start: float) -> ExportResult:
    if is_onnx(checkpoint):
        raise CheckpointError(f"{checkpoint} is already an ONNX model; export the .pth checkpoint it came from")
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):  # ORT: parity and int8
        raise CheckpointError(f"exporting to ONNX needs the onnx and onnxruntime packages: {INSTALL_HINT}")
    import onnx
    opset = opset or DEFAULT_OPSET
    model, meta = model_from_checkpoint(load_checkpoint(checkpoint))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise CheckpointError(f"{checkpoint}: {meta.arch} has {weight_bytes / 2**30:.1f} GiB of weights, more "
                              "than one ONNX file holds (2 GiB); run the checkpoint itself with predict "
                              "(--cpu-int8 on a CPU)")
    graph = _ExportGraph(model, meta.tta_flip).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as folder:
        path = Path(folder) / "fp32.onnx"
        _trace(graph, path, meta.input_size, opset)
        if int8:
            path = _quantize(path, Path(folder), model)
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, {META_KEY: _metadata(meta, checkpoint=checkpoint, int8=int8, opset=opset)})
        proto.producer_name, proto.producer_version = "retinafm", versions()["retinafm"]
        proto.doc_string = f"{meta.model_name} ({meta.arch}) {meta.task}: {', '.join(meta.class_names)}"
        with atomic_path(out) as tmp:
            onnx.save(proto, str(tmp))
            del proto
            logits_diff, features_diff = _parity(model, tmp, meta.input_size)
            if not int8 and max(logits_diff, features_diff) > FP32_TOLERANCE:
                raise CheckpointError(f"the ONNX export of {checkpoint} differs from PyTorch by up to "
                                      f"{max(logits_diff, features_diff):.2g} (logits {logits_diff:.2g}, features "
                                      f"{features_diff:.2g}); not written. Please report this with the model name "
                                      f"{meta.arch}")
    return ExportResult(out, time.perf_counter() - start, logits_diff, features_diff, int8, opset)

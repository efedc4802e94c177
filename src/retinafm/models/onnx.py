"""An exported ONNX model behind the nn.Module interface inference uses (run by ONNX Runtime on the CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # the checkpoint format lives above models/; only its type is named here
    from retinafm.engine.checkpoint import CheckpointMeta

INPUT, LOGITS, FEATURES = "images", "logits", "features"
META_KEY = "retinafm"


# --------------------------------------------------------------------------- running an export
class OnnxModel(nn.Module):
    """An exported model behind the interface `infer` and `embed` use: forward → logits and
    features → pooled features, torch tensors in and out (computed on the CPU by ONNX Runtime)."""

    def __init__(self, session: Any, meta: CheckpointMeta, path: Path):
        super().__init__()
        self.session, self.path = session, path
        self.global_pool = meta.global_pool  # embed reads str(model.global_pool) for its metadata
        self.tta_flip = meta.tta_flip  # already inside the logits

    def _run(self, x: torch.Tensor, output: str) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (result,) = self.session.run([output], {INPUT: images})
        return torch.from_numpy(result)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, LOGITS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, FEATURES)

"""An exported ONNX model behind the nn.Module interface inference uses (run by ONNX Runtime on the CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

INPUT, LOGITS, FEATURES = "images", "logits", "features"
META_KEY = "retinafm"


# --------------------------------------------------------------------------- running an export
class OnnxModel(nn.Module):
    """An exported model behind the interface `infer` and `embed` use: forward → logits and
    features → pooled features, torch tensors in and out (computed on the CPU by ONNX Runtime)."""

    owns_threads = True  # ONNX Runtime has its own intra-op pool: inference does not split torch's threads for it

    def __init__(self, session: Any, path: Path | None, *, global_pool: str, tta_flip: bool):
        super().__init__()
        self.session, self.path = session, path
        self.global_pool = global_pool  # embed reads str(model.global_pool) for its metadata
        self.tta_flip = tta_flip  # already inside the logits

    def _run(self, x: torch.Tensor, output: str) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (result,) = self.session.run([output], {INPUT: images})
        return torch.from_numpy(result)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, LOGITS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, FEATURES)

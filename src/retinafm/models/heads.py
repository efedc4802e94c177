"""Task heads on top of a backbone, initialised the way RETFound initialises them."""
from __future__ import annotations

import torch.nn as nn
from timm.layers import trunc_normal_

HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.", "head_dist.")
RETFOUND_HEAD_STD = 2e-5


def init_head(model: nn.Module, std: float = RETFOUND_HEAD_STD) -> None:
    """Truncated-normal weights (std 2e-5) and zero bias, so fine-tuning starts from ~uniform outputs."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)

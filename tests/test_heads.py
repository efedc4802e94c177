from __future__ import annotations

import torch

from retinafm.models.heads import RETFOUND_HEAD_STD, init_head
from retinafm.models.registry import create_model, get_spec


def test_head_is_initialised_like_retfound():
    torch.manual_seed(0)
    model = create_model(get_spec("vit_micro_patch8"), num_classes=4)
    init_head(model)
    w = model.head.weight.detach()
    # timm's trunc_normal_ (RETFound's call) truncates at ±2 absolute, i.e. a plain normal at this std.
    assert w.abs().max() < 10 * RETFOUND_HEAD_STD
    assert 0.5 * RETFOUND_HEAD_STD < w.std() < 1.5 * RETFOUND_HEAD_STD
    assert torch.all(model.head.bias == 0)
    # A fresh head gives near-uniform probabilities, so early training is stable.
    probs = torch.softmax(model(torch.randn(2, 3, 64, 64)), dim=1)
    torch.testing.assert_close(probs, torch.full_like(probs, 0.25), atol=1e-3, rtol=0)

"""timm's layer-decay groups and scheduler do what RETFound's hand-written versions did."""
from __future__ import annotations

import math

import pytest
import torch

from retinafm.engine.optim import (
    build_optimizer,
    build_scheduler,
    current_lr,
    effective_lr,
)
from retinafm.models.registry import create_model, get_spec


def test_effective_lr_scales_with_batch():
    assert effective_lr(None, 5e-3, 16, 1, 1) == pytest.approx(5e-3 * 16 / 256)
    assert effective_lr(None, 5e-3, 16, 2, 4) == pytest.approx(5e-3 * 128 / 256)
    assert effective_lr(1e-4, 5e-3, 16, 1, 1) == 1e-4


def test_layer_decay_groups():
    model = create_model(get_spec("vit_micro_patch8"), num_classes=2)  # depth 4
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert isinstance(opt, torch.optim.AdamW)
    scales = {}
    for g in opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            scales[name] = (g["lr_scale"], g["weight_decay"])
    depth = 4
    assert scales["head.weight"] == (pytest.approx(1.0), 0.05)
    assert scales["head.bias"][1] == 0.0  # no weight decay on biases / norms / tokens
    assert scales["cls_token"] == (pytest.approx(0.65 ** (depth + 1)), 0.0)
    assert scales["blocks.0.attn.qkv.weight"][0] == pytest.approx(0.65 ** depth)
    assert scales["blocks.3.mlp.fc1.weight"][0] == pytest.approx(0.65 ** 1)


def test_schedule_is_warmup_then_cosine_and_honours_lr_scale():
    model = create_model(get_spec("vit_micro_patch8"), num_classes=2)
    base, min_lr, steps, epochs, warm = 1e-3, 1e-6, 10, 5, 1
    opt = build_optimizer(model, lr=base, weight_decay=0.05, layer_decay=0.5)
    sched = build_scheduler(opt, steps_per_epoch=steps, epochs=epochs, warmup_epochs=warm, min_lr=min_lr)
    total, w = steps * epochs, steps * warm
    for t in [0, 5, 10, 30, 49, 50]:
        sched.step_update(t)
        cosine = 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))
        expected = base * t / w if t < w else min_lr + (base - min_lr) * cosine
        assert current_lr(opt) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected * g["lr_scale"], rel=1e-6, abs=1e-12)

"""DINO: the loss against a direct computation, centring, the momentum teacher, multi-crop."""
from __future__ import annotations

import math

import numpy as np
import torch

from retinafm.data.loader import Batch
from retinafm.data.transforms import MultiCrop
from retinafm.models.registry import get_spec
from retinafm.objectives.dino import Dino, DinoHead, DinoLoss, teacher_momentum
from retinafm.workflows.pretrain import build_encoder


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_loss_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    batch, crops, k = 3, 4, 10
    student = rng.normal(size=(crops * batch, k)).astype(np.float32)
    teacher = rng.normal(size=(2 * batch, k)).astype(np.float32)
    center = rng.normal(size=(1, k)).astype(np.float32) * 0.1
    loss_fn = DinoLoss(k, student_temp=0.1, teacher_temp=0.04)
    loss_fn.center.copy_(torch.from_numpy(center))
    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), crops).item()

    # Direct: for every image, every (teacher global view g, student view v != g) pair,
    # cross-entropy H(softmax((t_g - c)/0.04), softmax(s_v/0.1)); mean over images, then pairs.
    terms = []
    for g in range(2):
        for v in range(crops):
            if v == g:
                continue
            for i in range(batch):
                p = _softmax((teacher[g * batch + i] - center[0]) / 0.04)
                log_q = np.log(_softmax(student[v * batch + i] / 0.1))
                terms.append((g, v, -(p * log_q).sum()))
    pairs = {(g, v) for g, v, _ in terms}
    expected = np.mean([np.mean([t for g2, v2, t in terms if (g2, v2) == pair]) for pair in pairs])
    assert len(pairs) == 2 * crops - 2
    assert math.isclose(got, expected, rel_tol=1e-5)


def test_centre_is_an_ema_of_the_teacher_batch_mean():
    loss_fn = DinoLoss(5, center_momentum=0.9)
    teacher = torch.randn(6, 5)
    before = loss_fn.center.clone()
    loss_fn(torch.randn(12, 5), teacher, 4)
    torch.testing.assert_close(loss_fn.center, before * 0.9 + teacher.mean(0, keepdim=True) * 0.1)
    second = torch.randn(6, 5)
    expected = loss_fn.center * 0.9 + second.mean(0, keepdim=True) * 0.1
    loss_fn.update_center(second)
    torch.testing.assert_close(loss_fn.center, expected)


def test_teacher_temperature_warms_up_linearly():
    loss_fn = DinoLoss(4, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_epochs=3)
    temps = []
    for epoch in range(5):
        loss_fn.epoch = epoch
        temps.append(loss_fn.current_teacher_temp())
    np.testing.assert_allclose(temps, [0.04, 0.05, 0.06, 0.07, 0.07])


def _tiny_dino(**kwargs) -> Dino:
    torch.manual_seed(0)
    encoder = build_encoder(get_spec("vit_micro_patch8"), 32, dynamic_size=True)
    return Dino(encoder, out_dim=16, hidden_dim=32, bottleneck_dim=8, **kwargs)


def test_teacher_is_an_ema_of_the_student_on_the_cosine_schedule():
    dino = _tiny_dino(momentum=0.9, total_steps=10)
    student, teacher = dict(dino.student.named_parameters()), dict(dino.teacher.named_parameters())
    assert all(not p.requires_grad for p in teacher.values())
    with torch.no_grad():
        for p in student.values():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.items()}
    dino.update_teacher(step=0)  # m = 0.9 at the start of the schedule
    for name, p in teacher.items():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * student[name].detach())
    assert teacher_momentum(0, 10, 0.9) == 0.9
    assert math.isclose(teacher_momentum(5, 10, 0.9), 0.95)
    assert teacher_momentum(10, 10, 0.9) == 1.0


def test_gradients_reach_the_student_only_and_loss_is_finite():
    dino = _tiny_dino()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    loss = dino(Batch(crops, torch.empty(0), torch.arange(2)))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert dino.student.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in dino.teacher.parameters())
    # the prototype layer's norm is fixed at 1 (DINO's norm_last_layer)
    assert not dino.student.head.last_layer.parametrizations.weight.original0.requires_grad


def test_head_output_shape_and_checkpoint_layout():
    head = DinoHead(64, out_dim=16, hidden_dim=32, bottleneck_dim=8)
    assert head(torch.randn(5, 64)).shape == (5, 16)
    state = _tiny_dino().state_dict()  # a checkpoint's 'model': DINO's names under student. / teacher.
    assert {k.split(".")[0] for k in state} == {"student", "teacher", "loss_fn"}
    assert "teacher.backbone.blocks.0.attn.qkv.weight" in state and "loss_fn.center" in state
    assert any(k.startswith("teacher.head.") for k in state)


def test_multicrop_gives_two_global_and_n_local_views():
    image = torch.randint(0, 255, (3, 80, 90), dtype=torch.uint8)
    views = MultiCrop(32, 16, (0.5,) * 3, (0.25,) * 3, local_crops=3)(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)

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


# --- selectable heads -------------------------------------------------------------------------

import pytest  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from retinafm.models.heads import (  # noqa: E402
    HEAD_KINDS,
    HeadSettings,
    TransformerHead,
    attach_head,
    build_head,
    output_layer,
)

NUM_OUTPUTS = 3


def _vit(kind: str, **settings) -> VisionTransformer:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=NUM_OUTPUTS)
    attach_head(model, HeadSettings(kind, **settings), NUM_OUTPUTS)
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_each_head_gives_one_output_per_target_under_the_head_prefix(kind, images):
    torch.manual_seed(0)
    model = _vit(kind)
    assert model(images).shape == (2, NUM_OUTPUTS)
    head_keys = set(model.state_dict()) - set(VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0).state_dict())
    assert head_keys and all(k.startswith("head.") for k in head_keys)
    assert {n for n, _ in model.named_parameters() if n.startswith("head.")} <= head_keys
    assert output_layer(model.head).out_features in (NUM_OUTPUTS, 1)


def test_linear_head_keeps_timms_keys():
    model = _vit("linear")
    assert isinstance(model.head, torch.nn.Linear)
    assert {k for k in model.state_dict() if k.startswith("head.")} == {"head.weight", "head.bias"}
    assert output_layer(model.head) is model.head


def test_mlp_head_layout():
    head = build_head(HeadSettings("mlp", depth=2, mlp_ratio=1.5, dropout=0.0), 64, NUM_OUTPUTS)
    assert [k for k in head.state_dict()] == [
        "hidden.0.fc.weight", "hidden.0.fc.bias", "hidden.1.fc.weight", "hidden.1.fc.bias", "out.weight", "out.bias"]
    assert head.hidden[0].fc.out_features == 96 and head.out.in_features == 96
    assert output_layer(head) is head.out


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_state_dict_round_trip_gives_identical_outputs(kind, images):
    torch.manual_seed(0)
    trained = _vit(kind).eval()
    torch.manual_seed(1)
    fresh = _vit(kind).eval()
    fresh.load_state_dict(trained.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), trained(images), rtol=0, atol=0)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_gradients_reach_backbone_and_head(kind, images):
    torch.manual_seed(0)
    model = _vit(kind, dropout=0.0)
    model(images).square().sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("head.", "blocks.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_init_head_starts_near_uniform(kind, images):
    torch.manual_seed(0)
    model = _vit(kind).eval()
    init_head(model)
    out = output_layer(model.head)
    assert out.weight.abs().max() < 10 * RETFOUND_HEAD_STD and torch.all(out.bias == 0)
    with torch.no_grad():
        logits = model(images)
    assert logits.abs().max() < 1e-2
    # Layers inside the head keep a trainable scale (not shrunk to RETFound's 2e-5).
    for name, module in model.head.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out:
            assert 0.01 < module.weight.std() < 0.03, name
            assert torch.all(module.bias == 0), name


def test_transformer_output_depends_on_its_own_token(images):
    torch.manual_seed(0)
    model = _vit("transformer").eval()
    assert isinstance(model.head, TransformerHead)
    assert model.head.tokens.shape == (NUM_OUTPUTS, 64)
    with torch.no_grad():
        before = model(images)
        original = model.head.tokens.clone()
        for t in range(NUM_OUTPUTS):
            # Random, not constant: LayerNorm would cancel a uniform shift of the token.
            model.head.tokens[t] += torch.randn(64, generator=torch.Generator().manual_seed(t))
            after = model(images)
            model.head.tokens.copy_(original)
            assert (after[:, t] - before[:, t]).abs().min() > 1e-3, t


def test_transformer_head_on_timm_model_builds_without_warnings(recwarn):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32)
    attach_head(model, HeadSettings("transformer", depth=1, num_heads=3), 5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert not [w for w in recwarn if "nested" in str(w.message)]


def test_num_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="--head-num-heads 3 must divide the backbone width 64"):
        build_head(HeadSettings("transformer", num_heads=3), 64, NUM_OUTPUTS)


@pytest.mark.parametrize("settings, message", [
    (HeadSettings("conv"), "linear, mlp, transformer"),
    (HeadSettings("mlp", depth=0), "--head-depth"),
    (HeadSettings("transformer", num_heads=0), "--head-num-heads"),
    (HeadSettings("mlp", mlp_ratio=0.0), "--head-mlp-ratio"),
    (HeadSettings("mlp", dropout=1.0), "--head-dropout"),
])
def test_invalid_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        build_head(settings, 64, NUM_OUTPUTS)

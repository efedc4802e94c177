"""Segmentation models on zoo ViTs: shapes, names, gradients, skips and a known-answer overfit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.optim._param_groups import param_groups_layer_decay

from retinafm.models.registry import create_model, get_spec
from retinafm.models.segmentation import (
    HEAD_CHOICES,
    LinearSegHead,
    SegmentationModel,
    UNETRHead,
    build_segmentation_model,
    default_blocks,
)

MICRO = "vit_micro_patch8"  # 4 blocks, width 64, patch 8
DINO = "vit_small_patch14_reg4_dinov2"  # patch 14, class token + 4 registers
SMALL = {MICRO: 32, DINO: 56}


def _model(arch: str, head: str, num_classes: int = 3, **kwargs) -> SegmentationModel:
    torch.manual_seed(0)
    return build_segmentation_model(arch, num_classes, head=head, input_size=SMALL[arch], features=8, hidden=32,
                                    **kwargs)


@pytest.mark.parametrize("head", HEAD_CHOICES)
@pytest.mark.parametrize("arch", [MICRO, DINO])
def test_logits_have_the_input_size_square_and_not(arch: str, head: str):
    model = _model(arch, head).eval()
    size = SMALL[arch]
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 3, size, size)
        # Non-square, and a size the model was not built at (position embedding resampled).
        assert model(torch.randn(1, 3, size, 2 * size)).shape == (1, 3, size, 2 * size)
        patch = model.patch_size
        assert model(torch.randn(1, 3, 3 * patch, 5 * patch)).shape == (1, 3, 3 * patch, 5 * patch)


def test_register_tokens_are_dropped_from_the_maps():
    model = _model(DINO, "unetr")
    assert model.backbone.num_prefix_tokens == 5  # class + 4 registers
    maps = model.features(torch.randn(1, 3, 56, 84))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 4, 6)] * 4


def test_input_must_be_whole_patches():
    model = _model(MICRO, "linear")
    with pytest.raises(ValueError, match="8 px patches"):
        model(torch.randn(1, 3, 32, 36))


def test_unknown_head_and_wrong_blocks_are_refused():
    with pytest.raises(ValueError, match="linear, unetr"):
        build_segmentation_model(MICRO, 2, head="mlp")
    with pytest.raises(ValueError, match="blocks 0..3"):
        build_segmentation_model(MICRO, 2, head="unetr", blocks=(0, 1, 2, 7))
    with pytest.raises(ValueError, match="four blocks"):
        build_segmentation_model(MICRO, 2, head="unetr", blocks=(1, 3))


def test_default_blocks_follow_visionfm_and_space_evenly():
    assert default_blocks(12) == (3, 5, 7, 11)  # VisionFM ViT-B
    assert default_blocks(24) == (5, 11, 17, 23)  # VisionFM ViT-L
    assert default_blocks(4) == (0, 1, 2, 3)
    assert default_blocks(40) == (9, 19, 29, 39)
    assert default_blocks(2) == (0, 1)  # fewer blocks than taps: each block once
    assert _model(DINO, "unetr").head.blocks == (3, 5, 7, 11)
    assert _model(MICRO, "linear").head.blocks == (3,)


@pytest.mark.parametrize("head", HEAD_CHOICES)
def test_backbone_keeps_its_names_and_classifier_weights_load(head: str):
    model = _model(MICRO, head)
    torch.manual_seed(1)
    plain = create_model(get_spec(MICRO), num_classes=0, input_size=32)
    keys = list(model.state_dict())
    assert [k for k in keys if not k.startswith("head.")] == list(plain.state_dict())
    assert any(k.startswith("blocks.0.") for k in keys)
    # A classifier's checkpoint (e.g. RETFound fine-tuned) loads; only the classifier head differs.
    classifier = create_model(get_spec(MICRO), num_classes=5, input_size=32)
    result = model.load_state_dict(classifier.state_dict(), strict=False)
    assert set(result.unexpected_keys) == {"head.weight", "head.bias"}
    assert result.missing_keys and all(k.startswith("head.") for k in result.missing_keys)
    # ... and the backbone then computes with them: its maps equal the classifier's own.
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.features(x)[-1]
        theirs = classifier.forward_intermediates(x, indices=[model.head.blocks[-1]], norm=True,
                                                  intermediates_only=True)[-1]
    torch.testing.assert_close(ours, theirs)


def test_layer_decay_groups_the_backbone_by_block_and_the_head_on_top():
    model = _model(MICRO, "unetr")
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # timm: stem 0, blocks.N at N + 1, final norm and everything else (the head) at depth + 1.
    assert scale_of[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(0.5**4)
    assert scale_of[id(named["blocks.3.attn.qkv.weight"])] == pytest.approx(0.5**1)
    assert scale_of[id(named["patch_embed.proj.weight"])] == pytest.approx(0.5**5)
    assert all(scale_of[id(p)] == 1.0 for n, p in named.items() if n.startswith("head."))


@pytest.mark.parametrize("head", HEAD_CHOICES)
@pytest.mark.parametrize("arch", [MICRO, DINO])
def test_gradients_reach_the_first_block_and_the_head(arch: str, head: str):
    model = _model(arch, head).train()
    size = SMALL[arch]
    model(torch.randn(2, 3, size, size)).square().mean().backward()
    named = dict(model.named_parameters())
    assert named["blocks.0.attn.qkv.weight"].grad.abs().sum() > 0
    assert named["patch_embed.proj.weight"].grad.abs().sum() > 0
    assert model.head.out.weight.grad.abs().sum() > 0
    assert model.backbone.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("head", HEAD_CHOICES)
def test_a_square_is_overfitted(head: str):
    """Known answer: one 32x32 image with a bright square off the patch grid; the model must
    learn its mask (background alone scores 0.75 pixel accuracy, the square's recall 0)."""
    torch.manual_seed(0)
    model = build_segmentation_model(MICRO, 2, head=head, input_size=32, features=8, hidden=32).train()
    image = 0.1 * torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[:, 5:21, 11:27] = 1  # edges at 5, 21, 11, 27: none on the 8 px patch grid
    image[:, :, 5:21, 11:27] += 1.0
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(image), mask)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = model.eval()(image).argmax(1)
    accuracy = (predicted == mask).float().mean().item()
    recall = (predicted[mask == 1] == 1).float().mean().item()
    assert accuracy > 0.9 and recall > 0.8, (accuracy, recall)


def _perturb_only_the_tap(model: SegmentationModel, block: int, delta: float):
    """Hooks adding `delta` to block `block`'s output and taking it off again before the next
    block: only the map tapped at `block` changes, every later block computes as before."""
    blocks = model.backbone.blocks
    out = blocks[block].register_forward_hook(lambda m, i, o: o + delta)
    back = blocks[block + 1].register_forward_pre_hook(lambda m, args: (args[0] - delta,))
    return out, back


def test_unetr_reads_early_blocks_and_the_linear_head_does_not():
    x = torch.randn(1, 3, 32, 32)
    for head, expect_change in (("unetr", True), ("linear", False)):
        model = _model(MICRO, head).eval()
        with torch.no_grad():
            before = model(x)
            hooks = _perturb_only_the_tap(model, 0, 1.0)
            after = model(x)
            for hook in hooks:
                hook.remove()
            again = model(x)
        torch.testing.assert_close(again, before)
        assert (not torch.allclose(after, before, atol=1e-5)) == expect_change, head


def test_unetr_has_an_image_skip():
    """With the backbone's maps held fixed, the UNETR head's logits still follow the image (its
    pixel-level skip), pixel by pixel; the linear head's do not depend on the image at all."""
    torch.manual_seed(0)
    maps = [torch.randn(1, 64, 4, 4) for _ in range(4)]
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 12, 12] += 5.0
    unetr = UNETRHead(64, 3, blocks=(0, 1, 2, 3), patch_size=8, features=8).eval()
    linear = LinearSegHead(64, 3, blocks=(3,), hidden=32).eval()
    with torch.no_grad():
        diff = (unetr(maps, y) - unetr(maps, x)).abs().sum(1)[0]
        torch.testing.assert_close(linear(maps[-1:], y), linear(maps[-1:], x))
    assert diff[12, 12] > 0
    # Pixel-level: the change peaks at that pixel's neighbourhood (the skip is 4 conv3x3 deep at full
    # resolution, a 9x9 receptive field; GroupNorm's statistics spread a far smaller change elsewhere).
    row, col = divmod(int(diff.argmax()), diff.shape[1])
    assert abs(row - 12) <= 4 and abs(col - 12) <= 4, (row, col)
    assert diff[8:17, 8:17].mean() > 10 * diff[:, 20:].mean()


def test_projection_before_upsampling_equals_projection_after():
    """Why LinearSegHead projects on the patch grid: a 1x1 conv commutes with bilinear upsampling."""
    torch.manual_seed(0)
    grid = torch.randn(2, 16, 4, 6)
    conv = torch.nn.Conv2d(16, 5, 1)
    up = lambda t: F.interpolate(t, size=(28, 42), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(up(conv(grid)), conv(up(grid)), atol=1e-5, rtol=1e-5)


def test_heads_work_on_their_own():
    linear = LinearSegHead(16, 4, blocks=(0,), hidden=None)  # PR #55's literal order
    maps = [torch.randn(2, 16, 2, 3)]
    assert linear(maps, torch.randn(2, 3, 32, 48)).shape == (2, 4, 32, 48)
    unetr = UNETRHead(16, 4, blocks=(0, 1, 2, 3), patch_size=16, features=4)
    assert unetr(maps * 4, torch.randn(2, 3, 32, 48)).shape == (2, 4, 32, 48)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16", "vit_small_patch16_dinov3"])
def test_patch_16_backbones_including_rope(arch: str):
    """Patch 16: one extra deconvolution after x8 lands exactly on the input size; DINOv3 is timm's
    Eva class (RoPE, registers), not VisionTransformer, and works the same way."""
    for head in HEAD_CHOICES:
        torch.manual_seed(0)
        model = build_segmentation_model(arch, 2, head=head, input_size=32, features=4, hidden=8).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 48)).shape == (1, 2, 32, 48)
        plain = create_model(get_spec(arch), 0, input_size=32)
        assert [k for k in model.state_dict() if not k.startswith("head.")] == list(plain.state_dict())


def test_pretrained_weights_load_through_the_weight_loader(tmp_path):
    """A classifier checkpoint made at 64 px loads into a 32 px segmentation model through
    models.weights (the path RETFound weights take): classifier dropped, position embedding
    resampled by the backbone's timm filter, only the decoder newly initialised."""
    from retinafm.models.weights import load_backbone_weights

    torch.manual_seed(2)
    classifier = create_model(get_spec(MICRO), num_classes=5, input_size=64)
    path = tmp_path / "classifier.pth"
    torch.save({"model": classifier.state_dict()}, path)
    model = _model(MICRO, "unetr")
    report = load_backbone_weights(model, str(path))
    assert report.missing and all(k.startswith("head.") for k in report.missing)
    key = "blocks.2.mlp.fc1.weight"
    torch.testing.assert_close(model.state_dict()[key], classifier.state_dict()[key])
    assert model.pos_embed.shape == (1, 1 + 16, 64)  # 4x4 patches + class token, resampled from 8x8

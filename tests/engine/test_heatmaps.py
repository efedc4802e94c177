"""engine.heatmaps against cases with a known answer: attention that all flows to one patch, gradients
that are positive on one patch only, a model whose input is zero but for one patch."""
from __future__ import annotations

import pytest
import timm
import torch

from retinafm.engine.heatmaps import (
    METHODS,
    HeatmapError,
    attention_rollout,
    explain_batch,
    gradient_rollout,
    recorded_attention,
)

PATCH, SIDE = 8, 32  # a 4 x 4 grid of patches
GRID = SIDE // PATCH


def _vit(global_pool: str = "token", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, patch_size=PATCH, depth=2,
                             num_classes=3, global_pool=global_pool, **kwargs).eval()


def _towards(token: int, batch: int = 2, tokens: int = 1 + GRID * GRID, heads: int = 3) -> torch.Tensor:
    """Attention in which every token attends to `token` alone."""
    attention = torch.zeros(batch, heads, tokens, tokens)
    attention[..., token] = 1.0
    return attention


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_rollout_finds_the_patch_all_attention_flows_to(pool):
    patch = 9
    relevance = attention_rollout([_towards(1 + patch)] * 3, prefix_tokens=1, pool=pool)
    assert relevance.shape == (2, GRID * GRID)
    assert (relevance.argmax(1) == patch).all()


def test_gradient_rollout_follows_the_gradient_not_the_attention():
    """Uniform attention everywhere; the target's gradient is positive on one patch's column only."""
    tokens, patch = 1 + GRID * GRID, 5
    uniform = torch.full((2, 3, tokens, tokens), 1 / tokens)
    gradient = -torch.ones_like(uniform)
    gradient[..., 1 + patch] = 1.0
    relevance = gradient_rollout([uniform] * 2, [gradient] * 2, prefix_tokens=1)
    assert (relevance.argmax(1) == patch).all()
    assert (relevance.clamp(min=0).sum(1) > 0).all()


def test_recorded_attention_is_timms_softmax_and_fused_attention_comes_back():
    model = _vit()
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        expected = model(images)
        with recorded_attention(model) as attentions:
            again = model(images)
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)  # same outputs on the unfused path
    assert len(attentions) == 2 and attentions[0].shape == (2, 3, 17, 17)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 3, 17))
    block = model.blocks[0]
    with torch.no_grad():
        x = block.norm1(model._pos_embed(model.patch_embed(images)))
        q, k, _ = block.attn.qkv(x).reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(attentions[0], ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1))
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in model.blocks)


def test_integrated_gradients_credit_only_the_patch_that_differs_from_the_baseline():
    model = _vit()
    images = torch.zeros(1, 3, SIDE, SIDE)
    images[..., 16:24, 8:16] = torch.rand(3, 8, 8) + 0.5  # patch (row 2, column 1)
    heatmap = explain_batch(model, images, torch.tensor([1]), "integrated-gradients", steps=16)
    row, column = divmod(int(heatmap[0].argmax()), SIDE)
    assert (row // PATCH, column // PATCH) == (2, 1)
    assert heatmap[0][:16].max() == 0 and heatmap[0][24:].max() == 0  # a black pixel earns nothing


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_every_method_gives_one_unit_map_per_image_at_the_input_size(method, pool):
    model = _vit(pool)
    images = torch.randn(2, 3, SIDE, SIDE)
    heatmaps = explain_batch(model, images, torch.tensor([0, 2]), method, steps=4)
    assert heatmaps.shape == (2, SIDE, SIDE) and heatmaps.dtype == torch.float32
    assert torch.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in model.blocks)


def test_unknown_methods_and_models_without_vit_blocks_are_refused():
    with pytest.raises(HeatmapError, match="--method must be one of grad-rollout"):
        explain_batch(_vit(), torch.zeros(1, 3, SIDE, SIDE), torch.tensor([0]), "lime")
    with pytest.raises(HeatmapError, match="no timm ViT blocks"):
        explain_batch(torch.nn.Conv2d(3, 3, 1), torch.zeros(1, 3, SIDE, SIDE), torch.tensor([0]), "rollout")


def test_register_tokens_rope_and_tiny_layer_scales_still_give_maps():
    """DINOv2 with registers (5 prefix tokens) and DINOv3 (RoPE, layer scale 1e-5, avg pooling) in timm:
    the rollouts read past the prefix tokens and keep the blocks' small contributions."""
    for name, side in (("vit_small_patch14_reg4_dinov2", 56), ("vit_small_patch16_dinov3", 64)):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=3, img_size=side).eval()
        for method in ("grad-rollout", "rollout"):
            heatmaps = explain_batch(model, torch.randn(2, 3, side, side), torch.tensor([0, 1]), method)
            assert heatmaps.shape == (2, side, side)
            assert (heatmaps.flatten(1).max(1).values == 1).all(), (name, method)  # not a flat, all-zero map


def test_gradcam_finds_the_one_patch_the_output_reads():
    """Only one patch of the image is not black; no position embedding, no patch bias, no final norm. The
    first blocks are the identity (residual branches zeroed); the last one's attention is uniform with
    identity values and projection, so each token's gradient at `blocks[-1].norm1` is the head's weight
    over the token count. With that weight along the bright patch's normalised token, Grad-CAM's
    activation x mean gradient is positive on that patch and exactly zero on the black ones."""
    model = _vit("avg")
    dim = model.embed_dim
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_()
            block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
        last = model.blocks[-1].attn
        last.qkv.weight.zero_(), last.qkv.bias.zero_()
        last.qkv.weight[2 * dim:] = torch.eye(dim)  # q = k = 0: uniform attention; v = the token
        last.proj.weight.copy_(torch.eye(dim))
        model.pos_embed.zero_()
        model.patch_embed.proj.bias.zero_()
        model.norm, model.fc_norm = torch.nn.Identity(), torch.nn.Identity()
        images = torch.zeros(1, 3, SIDE, SIDE)
        images[..., 8:16, 24:32] = torch.rand(3, 8, 8) + 0.5  # patch (row 1, column 3)
        token = model.patch_embed(images)[0, 1 * GRID + 3]
        model.head.weight[1] = model.blocks[-1].norm1(token)  # class 1 reads along the bright patch's token
    heatmap = explain_batch(model, images, torch.tensor([1]), "gradcam")
    row, column = divmod(int(heatmap[0].argmax()), SIDE)
    assert (row // PATCH, column // PATCH) == (1, 3)
    centres = heatmap[0, PATCH // 2::PATCH, PATCH // 2::PATCH]  # one pixel inside each patch
    assert centres[1, 3] > 0.9 and (centres.flatten().sort().values[-2] < 0.5)  # the rest: only upsampling


@pytest.mark.parametrize("method", ["rollout", "grad-rollout", "gradcam"])
def test_a_flip_averaged_model_gives_mirror_symmetric_maps_of_a_mirror_symmetric_image(method):
    """Checkpoints with test-time flip averaging run the image and its mirror: both passes are read, the
    mirrored one mirrored back, so a symmetric image gets a symmetric map (one pass alone would not)."""
    from retinafm.engine.inference import _flip_averaged

    model = _vit("avg")
    half = torch.randn(1, 3, SIDE, SIDE // 2)
    images = torch.cat([half, half.flip(-1)], dim=-1)
    single = explain_batch(model, images, torch.tensor([0]), method)
    model.forward = _flip_averaged(model.forward)
    both = explain_batch(model, images, torch.tensor([0]), method)
    torch.testing.assert_close(both, both.flip(-1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(single, single.flip(-1), atol=1e-3)


def test_settings_offer_exactly_the_methods_there_are():
    import typing

    from retinafm.settings import HeatmapMethod

    assert typing.get_args(HeatmapMethod) == METHODS

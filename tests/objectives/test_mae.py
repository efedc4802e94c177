"""The masked autoencoder: exact masking, no leakage, MAE's key layout, a loss that falls."""
from __future__ import annotations

import pytest
import torch

from retinafm.models.registry import create_model, get_spec
from retinafm.models.weights import load_backbone_weights
from retinafm.objectives.mae import MaskedAutoencoder
from retinafm.workflows.pretrain import build_encoder

SPEC = get_spec("vit_micro_patch8")


def tiny_mae(mask_ratio: float = 0.75, **kwargs) -> MaskedAutoencoder:
    torch.manual_seed(0)
    settings = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=mask_ratio)
    settings.update(kwargs)
    mae = MaskedAutoencoder(build_encoder(SPEC, 32), **settings)
    mae.init_encoder_position()
    return mae


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_masking_removes_exactly_the_ratio_and_restores_order(ratio):
    mae = tiny_mae(ratio)
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    kept, mask, restore = mae.random_masking(tokens)
    keep = int(16 * (1 - ratio))
    assert kept.shape == (2, keep, 3)
    assert mask.shape == (2, 16) and torch.all(mask.sum(dim=1) == 16 - keep)
    for i in range(2):  # the kept tokens are exactly the unmasked positions, in shuffled order
        kept_rows = {tuple(r.tolist()) for r in kept[i]}
        assert kept_rows == {tuple(tokens[i, j].tolist()) for j in range(16) if mask[i, j] == 0}
    # restore undoes the shuffle: kept tokens then placeholders, gathered back, give the original positions
    placeholder = torch.full((2, 16 - keep, 3), -1.0)
    back = torch.gather(torch.cat([kept, placeholder], 1), 1, restore[:, :, None].expand(-1, -1, 3))
    assert torch.equal(back[mask == 0], tokens[mask == 0])
    assert torch.all(back[mask == 1] == -1)


def test_masked_patches_do_not_reach_the_encoder():
    mae = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    latent, mask, _ = mae.forward_encoder(images, noise)
    # Scramble every pixel of every masked patch: the encoder's output must not change at all.
    patches = mae.patchify(images)
    scrambled = mae.unpatchify(torch.where(mask[:, :, None].bool(), torch.randn_like(patches) * 10, patches))
    latent2, mask2, _ = mae.forward_encoder(scrambled, noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2, rtol=0, atol=0)
    # ...while changing a visible patch does change it (the test can fail).
    visible = (mask[0] == 0).nonzero()[0].item()
    patches[0, visible] += 5
    latent3, _, _ = mae.forward_encoder(mae.unpatchify(patches), noise)
    assert not torch.allclose(latent, latent3)
    assert latent.shape == (2, 1 + 4, 64)  # class token + the 25% of 16 patches kept


def test_patchify_is_maes_pixel_order_and_inverts():
    mae = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    patches = mae.patchify(images)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch (row 1, col 2), pixel (3, 5), channel 1 sits at index (3*8 + 5)*3 + 1 (MAE's 'nhwpqc')
    assert patches[0, 1 * 4 + 2, (3 * 8 + 5) * 3 + 1] == images[0, 1, 8 + 3, 16 + 5]
    torch.testing.assert_close(mae.unpatchify(patches), images)


def test_norm_pix_loss_is_mse_on_masked_normalised_patches():
    mae = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = (torch.rand(2, 16) > 0.5).float()
    target = mae.patchify(images)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae.loss(images, pred, mask), expected)
    mae.norm_pix_loss = False
    raw = (((pred - mae.patchify(images)) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae.loss(images, pred, mask), raw)


def test_state_dict_has_the_retfound_mae_key_layout():
    keys = set(tiny_mae().state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "mask_token", "decoder_embed.weight",
            "decoder_pos_embed", "decoder_norm.weight", "decoder_pred.weight", "blocks.3.attn.qkv.weight",
            "decoder_blocks.0.mlp.fc2.bias"} <= keys
    assert not any(k.startswith(("encoder.", "head", "fc_norm")) for k in keys)
    # MAE's fixed 2-D sin-cos embeddings: the class slot is zero and they are not trained.
    mae = tiny_mae()
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert torch.all(mae.pos_embed[0, 0] == 0) and mae.pos_embed[0, 1:].abs().sum() > 0


def test_loss_falls_in_a_few_steps():
    mae = tiny_mae()
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32).cumsum(dim=-1) / 8  # smooth rows: something to learn
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))
    noise = torch.rand(8, 16)  # the same mask each step, so the numbers compare
    losses = []
    for _ in range(25):
        loss, _, _ = mae.predict_masked(images, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 1.27 -> 0.93
    assert sum(losses[-5:]) < sum(losses[:5])


def test_saved_weights_load_through_the_retfound_mae_adapter_with_only_head_keys_missing(tmp_path):
    mae = tiny_mae()
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict(), "epoch": 3}, path)
    model = create_model(SPEC, 3, input_size=32, global_pool="avg")  # RETFound's fine-tuning model
    report = load_backbone_weights(model, str(path), "timm")
    assert report.family == "retfound_mae"
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, mae.blocks[2].mlp.fc1.weight)
    torch.testing.assert_close(model.pos_embed, mae.pos_embed)


def test_reconstruct_keeps_visible_patches_exactly():
    mae = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    masked, recon = mae.reconstruct(images, noise)
    _, _, mask = mae.predict_masked(images, noise)
    visible = (1 - mask)[:, :, None].bool()
    torch.testing.assert_close(mae.patchify(recon)[visible.expand(-1, -1, 192)],
                               mae.patchify(images)[visible.expand(-1, -1, 192)])
    assert torch.all(mae.patchify(masked)[(~visible).expand(-1, -1, 192)] == 0)


def test_refuses_models_it_cannot_mask():
    with pytest.raises(ValueError, match="mask-ratio"):
        tiny_mae(1.0)
    with pytest.raises(ValueError, match="multiple of --decoder-heads"):
        tiny_mae(decoder_dim=30)


def test_retfound_vit_large_defaults_have_maes_shapes():
    # Built on the meta device: shapes of MAE / RETFound's released ViT-L/16 pretraining checkpoints.
    with torch.device("meta"):
        mae = MaskedAutoencoder(build_encoder(get_spec("vit_large_patch16"), 224))
    shapes = {k: tuple(v.shape) for k, v in mae.state_dict().items()}
    assert shapes["pos_embed"] == (1, 197, 1024) and shapes["decoder_pos_embed"] == (1, 197, 512)
    assert shapes["decoder_embed.weight"] == (512, 1024) and shapes["decoder_pred.weight"] == (768, 512)
    assert shapes["mask_token"] == (1, 1, 512) and "decoder_blocks.7.attn.qkv.weight" in shapes
    assert "decoder_blocks.8.norm1.weight" not in shapes
    decoder = sum(v.numel() for k, v in mae.state_dict().items() if k.startswith(("decoder_", "mask_token")))
    assert 25e6 < decoder < 27e6  # MAE's ViT-L decoder: about 26 M parameters


def test_forward_on_a_batch_returns_the_masked_loss():
    from retinafm.data.loader import Batch

    mae = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    out = mae(Batch(images, torch.empty(0), torch.arange(2)))
    torch.manual_seed(3)
    expected, _, _ = mae.predict_masked(images)
    assert set(out) == {"loss"}
    torch.testing.assert_close(out["loss"], expected)

"""Masked autoencoder (He et al. 2022), the objective of RETFound's first stage.

The encoder is a timm VisionTransformer; its modules are registered here under MAE's own
names (`patch_embed`, `cls_token`, `pos_embed`, `blocks`, `norm`) next to the decoder's
(`mask_token`, `decoder_embed`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`,
`decoder_pred`), so `state_dict()` is exactly the key layout of MAE's and RETFound's released
pretraining checkpoints: such a file continues training here, and what is saved here loads
wherever RETFound-MAE weights do.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

DECODER_PREFIXES = ("mask_token", "decoder_")


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, *, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None \
                or encoder.num_prefix_tokens != 1 or encoder.no_embed_class or encoder.pos_embed is None:
            raise ValueError(f"MAE pretraining needs a plain ViT with one class token and absolute position "
                             f"embeddings (RETFound's, DINOv2's, timm's vit_*); {type(encoder).__name__} is not one")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"--decoder-dim {decoder_dim} must be a multiple of --decoder-heads {decoder_heads}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.grad_checkpointing = False  # recompute encoder blocks in backward (memory for compute)
        # The encoder's parts, under MAE's names (see the module docstring). `_grid` is plain data.
        self.patch_embed, self.cls_token, self.pos_embed = encoder.patch_embed, encoder.cls_token, encoder.pos_embed
        self.blocks, self.norm = encoder.blocks, encoder.norm
        self._grid = tuple(encoder.patch_embed.grid_size)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        width, num_patches = encoder.embed_dim, self._grid[0] * self._grid[1]

        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        self._init_decoder()
        # MAE keeps both position embeddings fixed: 2-D sin-cos, or whatever was loaded.
        self.pos_embed.requires_grad_(False)

    # ------------------------------------------------------------------ initialisation
    def sincos(self, dim: int) -> torch.Tensor:
        """(1, 1 + patches, dim): a zero row for the class token, then 2-D sin-cos per patch."""
        grid = build_sincos2d_pos_embed(list(self._grid), dim=dim)
        return torch.cat([torch.zeros(1, dim), grid], dim=0).unsqueeze(0)

    def init_encoder_position(self) -> None:
        """For an encoder trained from scratch: MAE's fixed sin-cos position embedding."""
        with torch.no_grad():
            self.pos_embed.copy_(self.sincos(self.pos_embed.shape[-1]))

    def _init_decoder(self) -> None:
        with torch.no_grad():
            self.decoder_pos_embed.copy_(self.sincos(self.decoder_pos_embed.shape[-1]))
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(DECODER_PREFIXES)}

    # ------------------------------------------------------------------ patches
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, L, p·p·3), each patch's pixels in MAE's (row, column, channel) order,
        which is what a RETFound/MAE `decoder_pred` predicts."""
        p, (h, w) = self.patch_size, self._grid
        x = images.reshape(images.shape[0], 3, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(images.shape[0], h * w, p * p * 3)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.patch_size, self._grid
        x = patches.reshape(patches.shape[0], h, w, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], 3, h * p, w * p)

    def random_masking(self, tokens: torch.Tensor, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random (1 - mask_ratio) of each image's patches. Returns the kept tokens, the
        mask (N, L: 1 = removed) and the permutation that restores the original order."""
        n, length, width = tokens.shape
        keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=tokens.device)
        shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, width))
        mask = torch.ones(n, length, device=tokens.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, restore = self.random_masking(x, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x), mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, visible = x.shape[0], x.shape[1] - 1
        masked = self.mask_token.expand(n, restore.shape[1] - visible, -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        target = self.patchify(images)
        if self.norm_pix_loss:  # each patch normalised by its own mean and variance (MAE's better setting)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the removed patches only."""
        per_patch = ((pred.float() - self.target(images).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def predict_masked(self, images: torch.Tensor, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, predicted patches (N, L, p·p·3), mask (N, L))."""
        latent, mask, restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, restore)
        return self.loss(images, pred, mask), pred, mask

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """{"loss": the reconstruction error of a fresh random mask of `batch.images`}."""
        return {"loss": self.predict_masked(batch.images)[0]}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction with the visible patches pasted back), both (N, 3, H, W)
        in the input's normalised units. A norm-pix model predicts each patch up to its mean and
        scale, which are taken from the original to draw it (as MAE's visualisations do)."""
        _, pred, mask = self.predict_masked(images, noise)
        target = self.patchify(images)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        keep = (1 - mask)[:, :, None]
        masked = self.unpatchify(target * keep)
        return masked, self.unpatchify(target * keep + pred * (1 - keep))

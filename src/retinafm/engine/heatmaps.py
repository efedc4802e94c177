"""Where a ViT looked: one relevance map per image and target, at the model's input resolution.

Methods (`METHODS`):
- `grad-rollout`: gradient-weighted attention rollout (Chefer et al., CVPR 2021, their rule for
  self-attention): R = I, then per block R += mean_heads(relu(grad * attention)) @ R. The most faithful
  on deletion / insertion tests in a 2026 benchmark on RETFound, so the default.
- `rollout`: attention rollout (Abnar & Zuidema 2020): per block, the head-averaged attention plus the
  residual identity, rows renormalised, multiplied through the blocks. No gradients.
- `gradcam`: Grad-CAM on the tokens entering the last block (`blocks[-1].norm1`, as DERETFound's
  figures): relu(sum_c mean_tokens(grad_c) * activation_c) per patch token.
- `integrated-gradients`: captum's IntegratedGradients from the all-zero input (the mean colour after
  normalisation), |attribution| summed over colour channels (pixel-level; the others are patch-level and
  upsampled).

The relevance of a patch is read from the row the head reads: the class token for `token` pooling,
the mean of the patch rows for `avg` pooling (RETFound's). Attention probabilities are recorded from
timm's `Attention` by switching its fused (SDPA) kernel off for the explained batch only, so ordinary
inference keeps SDPA. A checkpoint with test-time flip averaging runs two passes; their maps are averaged,
the mirrored one mirrored back. engine.explain lays the maps back on each file.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS: tuple[str, ...] = ("grad-rollout", "rollout", "gradcam", "integrated-gradients")


class HeatmapError(ValueError):
    """A model or method the heatmaps cannot handle; the message says what to use instead."""


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "attn_drop") for b in blocks):
        raise HeatmapError(f"{type(model).__name__} has no timm ViT blocks with attention to read; attention "
                           "heatmaps need a ViT (use --method integrated-gradients for other models)")
    return blocks


@contextlib.contextmanager
def recorded_attention(model: nn.Module, *, keep_grad: bool = False) -> Iterator[list[torch.Tensor]]:
    """Each block's attention probabilities (B, heads, tokens, tokens), in block order, for forward passes
    inside the block (their gradients kept with `keep_grad`). timm computes them only on its unfused
    path, so fused attention is switched off here and back on after."""
    records: list[torch.Tensor] = []

    def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if keep_grad and output.requires_grad:
            output.retain_grad()
        records.append(output)

    blocks = _blocks(model)
    fused = [block.attn.fused_attn for block in blocks]
    handles = [block.attn.attn_drop.register_forward_hook(record) for block in blocks]
    for block in blocks:
        block.attn.fused_attn = False
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for block, was in zip(blocks, fused, strict=True):
            block.attn.fused_attn = was


def pooled_relevance(mixing: torch.Tensor, prefix_tokens: int, pool: str) -> torch.Tensor:
    """(B, patches): the row of a (B, N, N) token-mixing matrix the head reads, over the patch columns."""
    if pool == "avg":
        return mixing[:, prefix_tokens:, prefix_tokens:].mean(1)
    return mixing[:, 0, prefix_tokens:]


def attention_rollout(attentions: Sequence[torch.Tensor], prefix_tokens: int, pool: str = "token") -> torch.Tensor:
    """Attention rollout over blocks' (B, H, N, N) attentions -> (B, patches)."""
    first = attentions[0]
    eye = torch.eye(first.shape[-1], device=first.device, dtype=torch.float32).expand(first.shape[0], -1, -1)
    rollout = eye
    for attention in attentions:
        mixed = attention.float().mean(1) + eye  # the residual connection carries each token on
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    return pooled_relevance(rollout, prefix_tokens, pool)


def gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], prefix_tokens: int,
                     pool: str = "token") -> torch.Tensor:
    """Chefer et al.'s gradient-weighted rollout -> (B, patches)."""
    first = attentions[0]
    eye = torch.eye(first.shape[-1], device=first.device, dtype=torch.float32).expand(first.shape[0], -1, -1)
    relevance = eye
    for attention, gradient in zip(attentions, gradients, strict=True):
        weighted = (gradient.float() * attention.float()).clamp(min=0).mean(1)
        relevance = relevance + weighted @ relevance
    # Read out what the blocks added: the identity gives every patch the same share under avg pooling, and
    # beside its 1.0 the additions of a model with tiny layer scales (DINOv3's 1e-5) vanish in float32.
    return pooled_relevance(relevance - eye, prefix_tokens, pool)


def _scores(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(images).float().gather(1, targets.view(-1, 1)).sum()


def _grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    patch = model.patch_embed.patch_size
    return images.shape[-2] // patch[0], images.shape[-1] // patch[1]


def _to_pixels(relevance: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, patches) -> (B, H, W) at the input size, each map scaled to 0..1."""
    maps = relevance.reshape(-1, 1, *grid)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
    return _unit(maps)


def _unit(maps: torch.Tensor) -> torch.Tensor:
    low = maps.flatten(1).min(1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(high > low, (maps - low) / (high - low).clamp(min=1e-12), torch.zeros_like(maps))


def _passes(records: Sequence[torch.Tensor], blocks: int) -> list[Sequence[torch.Tensor]]:
    """Per forward pass, its blocks' records: a checkpoint with test-time flip averaging runs two passes,
    the image and its mirror (engine.inference's `_flip_averaged`, in that order)."""
    if not records or len(records) % blocks:
        raise HeatmapError(f"recorded {len(records)} attention maps for {blocks} blocks; this model's forward is "
                           "not a plain pass through its blocks")
    return [records[i:i + blocks] for i in range(0, len(records), blocks)]


def _merged(per_pass: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """The passes' (B, patches) relevance averaged, the mirrored pass's mirrored back."""
    total = per_pass[0].float()
    for number, relevance in enumerate(per_pass[1:], start=1):
        if number % 2:
            relevance = relevance.reshape(-1, *grid).flip(-1).reshape(relevance.shape)
        total = total + relevance.float()
    return total / len(per_pass)


def rollout_with_outputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-rollout maps (B, H, W) in 0..1 and the model's outputs (B, outputs), from one forward pass:
    rollout does not depend on the target, so the pass that chooses the targets also gives the maps."""
    model.eval()
    _blocks(model)
    prefix, pool = int(getattr(model, "num_prefix_tokens", 1)), str(getattr(model, "global_pool", "token"))
    pool = "avg" if pool == "avg" else "token"
    with torch.no_grad(), recorded_attention(model) as attentions:
        logits = model(images)
    grid = _grid(model, images)
    relevance = [attention_rollout(part, prefix, pool) for part in _passes(attentions, len(_blocks(model)))]
    return _to_pixels(_merged(relevance, grid), grid, (images.shape[-2], images.shape[-1])), logits


def explain_batch(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str = "grad-rollout",
                  *, steps: int = 32) -> torch.Tensor:
    """Heatmaps (B, H, W) in 0..1 at the input size, for output `targets[b]` of image b."""
    if method not in METHODS:
        raise HeatmapError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    model.eval()
    size = (images.shape[-2], images.shape[-1])
    targets = targets.to(images.device).long()
    if method == "integrated-gradients":
        from captum.attr import IntegratedGradients

        attribution = IntegratedGradients(lambda x: model(x).float()).attribute(
            images, baselines=torch.zeros_like(images), target=targets, n_steps=steps,
            internal_batch_size=images.shape[0])  # memory of one batch, whatever the steps
        return _unit(attribution.abs().sum(1).detach())
    _blocks(model)  # attention methods need a ViT: refused before anything runs
    prefix, pool = int(getattr(model, "num_prefix_tokens", 1)), str(getattr(model, "global_pool", "token"))
    pool = "avg" if pool == "avg" else "token"
    grid = _grid(model, images)
    blocks = len(_blocks(model))
    if method == "rollout":
        return rollout_with_outputs(model, images)[0]
    if method == "grad-rollout":
        with torch.enable_grad(), recorded_attention(model, keep_grad=True) as attentions:
            model.zero_grad(set_to_none=True)
            _scores(model, images, targets).backward()
            pairs = [(a.detach(), a.grad) for a in attentions]
        relevance = [gradient_rollout([a for a, _ in part], [g for _, g in part], prefix, pool)
                     for part in _passes(pairs, blocks)]
        return _to_pixels(_merged(relevance, grid), grid, size)
    # gradcam: the tokens entering the last block's attention
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = _blocks(model)[-1].norm1.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            _scores(model, images, targets).backward()
    finally:
        handle.remove()
    cams = []
    for tokens in _passes(captured, 1):
        activation, grads = tokens[0][:, prefix:].detach().float(), tokens[0].grad[:, prefix:].float()
        cams.append((activation * grads.mean(1, keepdim=True)).sum(-1).clamp(min=0))
    return _to_pixels(_merged(cams, grid), grid, size)

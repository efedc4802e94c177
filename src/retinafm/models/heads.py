"""Task heads on top of a backbone, initialised the way RETFound initialises them.

timm's ViT ends in `self.head(pooled)` with pooled of shape (B, num_features), so any module
mapping (B, D) -> (B, num_outputs) can be assigned to `model.head`. All head parameters then live
under the `head.` key prefix, which is what the weight loader drops from pretraining checkpoints
and what linear probing trains.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.", "head_dist.")
RETFOUND_HEAD_STD = 2e-5
HIDDEN_STD = 0.02  # timm's ViT init for every Linear, kept for the layers inside a head
HEAD_KINDS = ("linear", "mlp", "transformer")


@dataclass(frozen=True)
class HeadSettings:
    """Which head to put on the backbone; saved in checkpoints so the head can be rebuilt."""

    kind: str = "linear"
    depth: int = 2  # mlp: number of hidden layers; transformer: encoder layers
    num_heads: int = 4  # transformer attention heads
    mlp_ratio: float = 2.0  # hidden width = in_features * mlp_ratio (mlp hidden layers; transformer feed-forward)
    dropout: float = 0.1  # mlp and transformer heads


class MLPHead(nn.Module):
    """`depth` x (Linear -> GELU -> Dropout), then the output Linear."""

    def __init__(self, in_features: int, num_outputs: int, depth: int, hidden_features: int, dropout: float):
        super().__init__()
        blocks = []
        width = in_features
        for _ in range(depth):
            blocks.append(nn.Sequential(OrderedDict(
                fc=nn.Linear(width, hidden_features), act=nn.GELU(), drop=nn.Dropout(dropout),
            )))
            width = hidden_features
        self.hidden = nn.Sequential(*blocks)
        self.out = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


class TransformerHead(nn.Module):
    """The projected pooled feature plus one learnable token per output (the multi-target
    script's query tokens), mixed by a small pre-norm transformer encoder; each output token is
    read out by a shared Linear(D, 1). Adding the feature to every token gives each output a
    direct path to the image (a separate context token only reached them through attention and
    trained far slower); the encoder then lets correlated outputs inform each other."""

    def __init__(self, in_features: int, num_outputs: int, depth: int, num_heads: int,
                 hidden_features: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_features, in_features)
        self.tokens = nn.Parameter(torch.zeros(num_outputs, in_features))
        layer = nn.TransformerEncoderLayer(
            d_model=in_features, nhead=num_heads, dim_feedforward=hidden_features, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # Nested tensors only help with padding masks (none here), and with norm_first torch
        # would warn about disabling them on every construction.
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(in_features)
        self.out = nn.Linear(in_features, 1)
        trunc_normal_(self.tokens, std=HIDDEN_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.proj(x).unsqueeze(1) + self.tokens.unsqueeze(0)  # (B, T, D)
        return self.out(self.norm(self.encoder(seq))).squeeze(-1)  # (B, T)


def _check(settings: HeadSettings, in_features: int, num_outputs: int) -> int:
    """Validate the settings; returns the hidden width."""
    if settings.kind not in HEAD_KINDS:
        raise ValueError(f"--head must be one of {', '.join(HEAD_KINDS)}, not {settings.kind!r}")
    if in_features < 1 or num_outputs < 1:
        raise ValueError(f"a head needs at least one input and one output, got {in_features} -> {num_outputs}")
    if settings.depth < 1:
        raise ValueError(f"--head-depth must be at least 1, got {settings.depth}")
    if settings.num_heads < 1:
        raise ValueError(f"--head-num-heads must be at least 1, got {settings.num_heads}")
    if not settings.mlp_ratio > 0:
        raise ValueError(f"--head-mlp-ratio must be positive, got {settings.mlp_ratio}")
    if not 0.0 <= settings.dropout < 1.0:
        raise ValueError(f"--head-dropout must be in [0, 1), got {settings.dropout}")
    hidden = int(in_features * settings.mlp_ratio)
    if settings.kind != "linear" and hidden < 1:
        raise ValueError(f"--head-mlp-ratio {settings.mlp_ratio} leaves no hidden units for width {in_features}")
    if settings.kind == "transformer" and in_features % settings.num_heads:
        raise ValueError(f"--head-num-heads {settings.num_heads} must divide the backbone width {in_features}")
    return hidden


def _init_hidden(head: nn.Module) -> None:
    """timm's ViT init for everything in a head except the output layer."""
    for module in head.modules():
        if isinstance(module, nn.Linear):  # includes attention's out_proj
            trunc_normal_(module.weight, std=HIDDEN_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            # The fused q/k/v projection is a bare Parameter, i.e. timm's `qkv` Linear.
            trunc_normal_(module.in_proj_weight, std=HIDDEN_STD)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if isinstance(head, TransformerHead):
        trunc_normal_(head.tokens, std=HIDDEN_STD)


def build_head(settings: HeadSettings, in_features: int, num_outputs: int) -> nn.Module:
    """A head mapping (B, in_features) -> (B, num_outputs), with timm's ViT initialisation."""
    hidden = _check(settings, in_features, num_outputs)
    if settings.kind == "linear":
        head: nn.Module = nn.Linear(in_features, num_outputs)
    elif settings.kind == "mlp":
        head = MLPHead(in_features, num_outputs, settings.depth, hidden, settings.dropout)
    else:
        head = TransformerHead(in_features, num_outputs, settings.depth, settings.num_heads, hidden,
                               settings.dropout)
    # Same starting point as timm gives its own linear head; init_head shrinks the output layer
    # once pretrained weights are in.
    _init_hidden(head)
    return head


def attach_head(model: nn.Module, settings: HeadSettings, num_outputs: int) -> None:
    """Replace `model.head` with the head `settings` describe, fed by `model.num_features`."""
    model.head = build_head(settings, model.num_features, num_outputs)


def output_layer(head: nn.Module) -> nn.Linear:
    """The final Linear that produces the outputs."""
    if isinstance(head, nn.Linear):
        return head
    out = getattr(head, "out", None)
    if isinstance(out, nn.Linear):
        return out
    raise TypeError(f"{type(head).__name__} has no output Linear")


def init_head(model: nn.Module, std: float = RETFOUND_HEAD_STD) -> None:
    """RETFound's head init: the output Linear gets truncated-normal weights (std 2e-5) and zero
    bias, so fine-tuning starts from ~uniform outputs; layers inside the head get timm's ViT init
    (std 0.02, zero bias; LayerNorm ones/zeros; learnable tokens std 0.02)."""
    head = getattr(model, "head", None)
    if not isinstance(head, (nn.Linear, MLPHead, TransformerHead)):
        return  # e.g. nn.Identity (num_classes=0): nothing to initialise
    if not isinstance(head, nn.Linear):
        _init_hidden(head)
    out = output_layer(head)
    trunc_normal_(out.weight, std=std)
    nn.init.zeros_(out.bias)

"""The refinement model: a zoo vision backbone + a BERT-family text encoder from `transformers`
whose upper layers get cross-attention to the image tokens (used only in the fused passes of
ITM, MLM and GM, as in RetFiner), projection heads into a shared contrastive space, a matching
head and a language-model head tied to the word embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from retinafm.objectives import vision_language_losses as L
from retinafm.runtime import distributed as dist_utils

OBJECTIVES = ("itc", "itm", "mlm", "gm")


class TextModelError(ValueError):
    """--text-model cannot be used (not found, not BERT-family, transformers missing)."""


def load_text_model(name: str) -> tuple[nn.Module, object]:
    """A BERT-family encoder and its tokenizer from a hub id or a local folder (offline cache
    honoured: HF_HUB_OFFLINE=1 and HF_TOKEN work as everywhere in the Hugging Face stack)."""
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise TextModelError("retinafm refine needs transformers: pip install 'retinafm[refine]'") from None
    hf_logging.disable_progress_bar()  # one bar per weight file; our own progress is enough
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        where = "folder" if Path(name).exists() else \
            "Hugging Face repo (set HF_TOKEN for gated ones; offline, it must be in the cache)"
        raise TextModelError(f"--text-model {name}: cannot load it as a {where}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if getattr(model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList) \
            or not all(hasattr(layer, n) for layer in layers for n in ("attention", "intermediate", "output")):
        raise TextModelError(f"--text-model {name} is a {type(model).__name__}; refinement needs a BERT-family encoder "
                             "(BERT, BioClinicalBERT, PubMedBERT, MiniLM, ...)")
    if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None:
        raise TextModelError(f"--text-model {name}: its tokenizer has no [MASK]/[CLS] token")
    return model, tokenizer


class CrossAttention(nn.Module):
    """Text tokens attend to image tokens; post-norm residual like the BERT layer around it."""

    def __init__(self, width: int, image_width: int, heads: int, eps: float, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, kdim=image_width, vdim=image_width, dropout=dropout,
                                          batch_first=True)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(text, image, image, need_weights=False)
        return self.norm(text + self.dropout(out))


class VisionLanguage(nn.Module):
    def __init__(self, vision: nn.Module, text: nn.Module, *, fusion_layers: int | None = None,
                 embed_dim: int = 256) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        config = text.config
        width, depth = config.hidden_size, len(text.encoder.layer)
        self.fusion_start = depth - (fusion_layers if fusion_layers is not None else max(1, depth // 2))
        if not 0 <= self.fusion_start < depth:
            raise ValueError(f"--fusion-layers must be between 1 and the text model's {depth} layers")
        vision_width = vision.num_features
        self.cross = nn.ModuleList(
            CrossAttention(width, vision_width, config.num_attention_heads, config.layer_norm_eps)
            for _ in range(depth - self.fusion_start))
        self.vision_proj, self.text_proj = nn.Linear(vision_width, embed_dim), nn.Linear(width, embed_dim)
        self.log_temp = nn.Parameter(torch.tensor(0.07).log())  # learnable, CLIP/ALBEF's starting 0.07
        self.itm_head = nn.Linear(width, 2)
        self.lm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                          nn.LayerNorm(width, eps=config.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(text.embeddings.word_embeddings.num_embeddings))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temp.exp().clamp(0.001, 0.5)

    # ------------------------------------------------------------------ encoders
    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(all output tokens, the pooled feature the backbone's head would see)."""
        tokens = self.vision.forward_features(images)
        return tokens, self.vision.forward_head(tokens, pre_logits=True)

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """The text encoder's last hidden states. With `image` tokens the upper layers also
        cross-attend to them (the fused passes); `causal` masks future tokens (GM)."""
        h = self.text.embeddings(input_ids=input_ids)
        keep = attention_mask[:, None, None, :].bool()
        if causal:
            n = input_ids.shape[1]
            keep = keep & torch.ones(n, n, dtype=torch.bool, device=h.device).tril()[None, None]
        mask = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(~keep, torch.finfo(h.dtype).min)
        for i, layer in enumerate(self.text.encoder.layer):
            h = layer.attention(h, mask)[0]
            if image is not None and i >= self.fusion_start:
                h = self.cross[i - self.fusion_start](h, image)
            h = layer.output(layer.intermediate(h), h)
        return h

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Tied to the word embeddings, like BERT's own prediction head.
        return self.lm_transform(hidden) @ self.text.embeddings.word_embeddings.weight.T + self.lm_bias

    def embed_pair(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        tokens, pooled = self.image_tokens(images)
        text_cls = self.text_hidden(input_ids, attention_mask)[:, 0]
        return tokens, F.normalize(self.vision_proj(pooled), dim=-1), F.normalize(self.text_proj(text_cls), dim=-1)


def _gather_with_grad(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensors, concatenated in rank order; gradients flow back to the rank that owns
    each row (torch.distributed.nn's autograd all_gather, whose deprecation notice points to a
    private module: silenced here rather than shown to users)."""
    import warnings

    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [torch.cat(dist_nn.all_gather(t)) for t in tensors]


class RefineObjective(nn.Module):
    """forward(batch) → {"loss": the weighted sum of the chosen losses, "loss_<name>": each one} for
    the pairs `batch.targets` (rows of the tokenised report table, kept on the device as buffers)."""

    def __init__(self, model: VisionLanguage, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 report_ids: torch.Tensor, *, weights: dict[str, float], mask_token_id: int, vocab_size: int,
                 special_ids: list[int], mlm_probability: float = 0.15) -> None:
        super().__init__()
        self.model, self.weights = model, {k: w for k, w in weights.items() if w}
        self.mask_token_id, self.vocab_size, self.mlm_probability = mask_token_id, vocab_size, mlm_probability
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)
        self.register_buffer("report_ids", report_ids, persistent=False)
        self.register_buffer("special_ids", torch.tensor(special_ids, dtype=torch.long), persistent=False)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        parts = self.losses(batch.images, batch.targets)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return {"loss": total, **{f"loss_{k}": parts[k].detach() for k in self.weights}}

    def losses(self, images: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each chosen objective's (unweighted) loss on these images and report rows."""
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        length = int(mask.sum(dim=1).max())  # the table is padded to its longest report; this batch may be shorter
        ids, mask = ids[:, :length], mask[:, :length]
        model = self.model
        tokens, image_emb, text_emb = model.embed_pair(images, ids, mask)
        parts: dict[str, torch.Tensor] = {}
        report_ids = self.report_ids[rows]
        if "itc" in self.weights:
            if dist_utils.is_distributed():  # negatives from every rank's batch, gradients flow back
                all_image, all_text, all_reports = _gather_with_grad(image_emb, text_emb, report_ids)
                parts["itc"] = L.itc_loss(image_emb, text_emb, model.temperature, dist_utils.rank() * len(rows),
                                          all_image, all_text, positives=report_ids[:, None] == all_reports[None, :])
            else:
                parts["itc"] = L.itc_loss(image_emb, text_emb, model.temperature,
                                          positives=report_ids[:, None] == report_ids[None, :])
        if "itm" in self.weights:
            parts["itm"] = self._itm(tokens, image_emb, text_emb, ids, mask, report_ids)
        if "mlm" in self.weights:
            maskable = (mask == 1) & ~torch.isin(ids, self.special_ids)
            masked, labels = L.mask_tokens(ids, maskable, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                           probability=self.mlm_probability)
            hidden = model.text_hidden(masked, mask, tokens)
            chosen = labels != L.IGNORE  # the vocabulary projection only where there is something to predict
            parts["mlm"] = L.token_loss(model.lm_logits(hidden[chosen]), labels[chosen])
        if "gm" in self.weights:
            logits = model.lm_logits(model.text_hidden(ids, mask, tokens, causal=True))
            parts["gm"] = L.next_token_loss(logits, ids, mask)
        return parts

    def _itm(self, tokens, image_emb, text_emb, ids, mask, report_ids) -> torch.Tensor:
        model = self.model
        same = report_ids[:, None] == report_ids[None, :]
        neg_text, neg_image = L.hard_negatives(image_emb @ text_emb.T, same)
        pos = model.itm_head(model.text_hidden(ids, mask, tokens)[:, 0])
        img_rows, txt_rows = torch.nonzero(neg_text >= 0).squeeze(1), torch.nonzero(neg_image >= 0).squeeze(1)
        # (image i, a wrong report) and (a wrong image, report j)
        neg_tokens = torch.cat([tokens[img_rows], tokens[neg_image[txt_rows]]])
        neg_ids = torch.cat([ids[neg_text[img_rows]], ids[txt_rows]])
        neg_mask = torch.cat([mask[neg_text[img_rows]], mask[txt_rows]])
        if len(neg_ids) == 0:
            return L.itm_loss(pos, pos[:0])
        neg = model.itm_head(model.text_hidden(neg_ids, neg_mask, neg_tokens)[:, 0])
        return L.itm_loss(pos, neg)

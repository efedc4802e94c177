"""The four refinement objectives as plain functions on tensors (tested against direct computations).

- ITC: symmetric InfoNCE between normalised image and report embeddings.
- ITM: binary matched / not matched on the fused [CLS], with hard negatives drawn from the
  contrastive similarities (never the positive pair, nor another copy of the same report).
- MLM: masked language modelling conditioned on the image (BERT's 15% / 80-10-10 rule).
- GM: generating the report from the image, next-token prediction under a causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # cross_entropy's ignore_index: positions that carry no target


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: torch.Tensor | float,
             offset: int = 0, all_image_emb: torch.Tensor | None = None,
             all_text_emb: torch.Tensor | None = None, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of image→text and text→image cross-entropy over cosine similarities / temperature.
    With several processes, `all_*` are every rank's embeddings (negatives from the whole
    batch) and `offset` is where this rank's rows start in them. `positives` (B, N bool, the
    diagonal included) spreads the target over every copy of the same report: templated reports
    ("Normal fundus.") repeat within a batch and are not negatives of each other."""
    all_text = text_emb if all_text_emb is None else all_text_emb
    all_image = image_emb if all_image_emb is None else all_image_emb
    i2t = image_emb @ all_text.T / temperature
    t2i = text_emb @ all_image.T / temperature
    if positives is None:
        targets = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    else:
        targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets)) / 2


def hard_negatives(similarity: torch.Tensor, same_report: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i of the (B, B) image→text similarity, a text index j drawn with probability
    softmax(similarity[i]) over the texts that are not i's report (j != i and a different report
    text); -1 where no such text exists. Returns (negative text per image, negative image per text)."""
    def draw(sim: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(sim.float(), dim=1).masked_fill(same_report, 0.0)
        has = weights.sum(dim=1) > 0
        picks = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
        if has.any():
            picks[has] = torch.multinomial(weights[has], 1, generator=generator).squeeze(1)
        return picks

    with torch.no_grad():
        same_report = same_report | torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
        return draw(similarity), draw(similarity.T)


def itm_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way matching head: label 1 for the true pairs, 0 for the negatives."""
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat([torch.ones(len(positive_logits)), torch.zeros(len(negative_logits))]).long()
    return F.cross_entropy(logits, labels.to(logits.device))


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                probability: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable token is chosen with `probability`; a chosen token becomes
    [MASK] (80%), a random token (10%) or stays (10%). Returns (inputs, labels) with labels IGNORE
    where nothing was chosen."""
    device = input_ids.device

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator).to(device)

    chosen = (uniform() < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    inputs = input_ids.clone()
    to_mask = chosen & (uniform() < 0.8)
    inputs[to_mask] = mask_token_id
    to_random = chosen & ~to_mask & (uniform() < 0.5)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator).to(device)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with a label (MLM). Zero when there are none."""
    if not (labels != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """GM: position t predicts token t+1 of the report; padding predicts nothing."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return token_loss(logits[:, :-1], labels)

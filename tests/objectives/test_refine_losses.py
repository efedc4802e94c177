"""The four refinement objectives against direct computations on fixed tensors."""
from __future__ import annotations

import math

import numpy as np
import torch

from retinafm.objectives import vision_language_losses as L


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_itc_is_symmetric_infonce():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 8))
    txt = rng.normal(size=(4, 8))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    t = 0.07
    sim = img @ txt.T / t
    expected = (-np.mean(np.diag(_log_softmax(sim))) - np.mean(np.diag(_log_softmax(sim.T)))) / 2
    got = L.itc_loss(torch.tensor(img), torch.tensor(txt), t).item()
    assert math.isclose(got, expected, rel_tol=1e-9)


def test_itc_with_negatives_from_other_ranks():
    rng = np.random.default_rng(1)
    all_img, all_txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    # This "rank" holds rows 2-3 of the global batch of 6.
    got = L.itc_loss(torch.tensor(all_img[2:4]), torch.tensor(all_txt[2:4]), 0.1, offset=2,
                     all_image_emb=torch.tensor(all_img), all_text_emb=torch.tensor(all_txt)).item()
    i2t, t2i = _log_softmax(all_img[2:4] @ all_txt.T / 0.1), _log_softmax(all_txt[2:4] @ all_img.T / 0.1)
    expected = (-(i2t[0, 2] + i2t[1, 3]) / 2 - (t2i[0, 2] + t2i[1, 3]) / 2) / 2
    assert math.isclose(got, expected, rel_tol=1e-9)


def test_hard_negatives_are_never_the_positive_nor_the_same_report():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 3
    sim.fill_diagonal_(50.0)  # the positive dominates the softmax: it must still never be drawn
    reports = torch.tensor([0, 1, 1, 2, 3, 0])  # pairs 1/2 and 0/5 share a report text
    same = reports[:, None] == reports[None, :]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_text, neg_image = L.hard_negatives(sim, same, generator)
        for i in range(6):
            for j in (neg_text[i].item(), neg_image[i].item()):
                assert j != i and reports[j] != reports[i]
    # Harder negatives (higher similarity) are drawn more often.
    sim = torch.zeros(3, 3)
    sim[0, 1], sim[0, 2] = 3.0, 0.0
    counts = np.bincount([L.hard_negatives(sim, torch.zeros(3, 3, dtype=torch.bool), generator)[0][0].item()
                          for _ in range(300)], minlength=3)
    assert counts[0] == 0 and counts[1] > 5 * counts[2]


def test_hard_negatives_report_rows_without_any():
    same = torch.ones(3, 3, dtype=torch.bool)  # one report for every image: no negative exists
    neg_text, neg_image = L.hard_negatives(torch.randn(3, 3), same)
    assert neg_text.tolist() == [-1, -1, -1] and neg_image.tolist() == [-1, -1, -1]


def test_itm_is_binary_cross_entropy_over_pairs():
    pos = torch.tensor([[0.2, 1.5], [1.0, -0.5]], dtype=torch.float64)
    neg = torch.tensor([[2.0, 0.1], [0.3, 0.3], [-1.0, 1.0]], dtype=torch.float64)
    lp, ln = _log_softmax(pos.numpy()), _log_softmax(neg.numpy())
    expected = -(lp[:, 1].sum() + ln[:, 0].sum()) / 5
    assert math.isclose(L.itm_loss(pos, neg).item(), expected, rel_tol=1e-9)


def test_mask_tokens_follows_berts_rule():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (400, 50), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # e.g. [CLS]
    inputs, labels = L.mask_tokens(ids, maskable, mask_token_id=4, vocab_size=100, probability=0.15,
                                   generator=generator)
    chosen = labels != L.IGNORE
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 49 / 50) < 0.01
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.03
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.03  # (plus the rare random draw of itself)


def test_token_and_next_token_losses():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 7))
    labels = np.array([[L.IGNORE, 3, L.IGNORE, 6], [1, L.IGNORE, L.IGNORE, L.IGNORE]])
    lp = _log_softmax(logits)
    expected = -(lp[0, 1, 3] + lp[0, 3, 6] + lp[1, 0, 1]) / 3
    # (the losses compute in float32, as under autocast)
    assert math.isclose(L.token_loss(torch.tensor(logits), torch.tensor(labels)).item(), expected, rel_tol=1e-6)
    ids = torch.tensor([[2, 5, 6, 3], [2, 4, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # position t predicts token t+1; the padded last position of row 2 predicts nothing
    expected = -(lp[0, 0, 5] + lp[0, 1, 6] + lp[0, 2, 3] + lp[1, 0, 4] + lp[1, 1, 3]) / 5
    assert math.isclose(L.next_token_loss(torch.tensor(logits), ids, mask).item(), expected, rel_tol=1e-6)
    assert L.token_loss(torch.tensor(logits), torch.full((2, 4), L.IGNORE)).item() == 0.0


def test_itc_spreads_the_target_over_copies_of_the_same_report():
    rng = np.random.default_rng(3)
    img, txt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    reports = np.array([0, 1, 0, 2])  # pairs 0 and 2 carry the same report text
    same = reports[:, None] == reports[None, :]
    target = same / same.sum(axis=1, keepdims=True)
    i2t, t2i = _log_softmax(img @ txt.T / 0.1), _log_softmax(txt @ img.T / 0.1)
    expected = (-(target * i2t).sum(axis=1).mean() - (target * t2i).sum(axis=1).mean()) / 2
    got = L.itc_loss(torch.tensor(img), torch.tensor(txt), 0.1, positives=torch.tensor(same)).item()
    assert math.isclose(got, expected, rel_tol=1e-9)
    # with distinct reports it is the one-positive InfoNCE
    eye = torch.eye(4, dtype=torch.bool)
    assert math.isclose(L.itc_loss(torch.tensor(img), torch.tensor(txt), 0.1, positives=eye).item(),
                        L.itc_loss(torch.tensor(img), torch.tensor(txt), 0.1).item(), rel_tol=1e-12)
